"""Building blocks of the download stage: HTTP fetching, archives and compression, line decoding, the Bible reader."""
