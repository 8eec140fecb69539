"""The project's special-token ids: XLM-R's layout, so a trained model exports to Hugging Face without remapping.

``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3; sentencepiece piece k >= 3 becomes k + 1; ``<mask>`` is the last id.
Only this module and ``xlm_core.tokenizer`` know these numbers.
"""
BOS = 0
PAD = 1
EOS = 2
UNK = 3
FIRST_PIECE = 4          # the first id of an ordinary sentencepiece piece
SPM_OFFSET = 1           # project id = sentencepiece id + SPM_OFFSET for sentencepiece ids >= 3
N_SPECIAL_LOW = 4        # ids below FIRST_PIECE are special


def mask_id(vocab_size: int) -> int:
    """``<mask>`` is the last id of the vocabulary (N + 1 for a sentencepiece model of size N)."""
    return vocab_size - 1
