"""Bad values that used to pass validation or fail deep inside a stage (issue 16): each is one line at the key.

In-process: the stages call ``load_params`` first (before touching any output), so this is the line they print.
The property-based test feeds random mutations of the shipped params.yaml to every section's validation.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.params.loading import SECTIONS, load_params
from xlm_core.errors import XLMError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())
INF, NAN = math.inf, math.nan


def refusal(tmp_path: Path, section: str, params: dict | None = None, raw: bytes | None = None) -> str:
    path = tmp_path / "params.yaml"
    if raw is None:
        path.write_text(yaml.safe_dump(params, allow_unicode=True))
    else:
        path.write_bytes(raw)
    with pytest.raises(XLMError) as info:
        load_params(section, path)
    message = str(info.value)
    assert "\n" not in message and len(message) <= 400, message
    return message


def mutated(**sections) -> dict:
    params = copy.deepcopy(SHIPPED)
    for dotted, value in sections.items():
        *parents, key = dotted.split("__")
        node = params
        for parent in parents:
            node = node[parent]
        node[key] = value
    return params


@pytest.mark.parametrize("section,change,expected", [
    ("clean", {"clean__split": {"valid": 0.49, "test": 0.49}},
     "clean.split.test = 0.49: with valid 0.49 it holds out 98 % of the text, leaving 2 % for training"),
    ("pretrain", {"pretrain__adversarial__layer": 99, "pretrain__adversarial__weight": 1.0},
     "pretrain.adversarial.layer = 99: the model has 2 layers"),
    ("pretrain", {"languages": ["en"], "pairs": [], "pretrain__adversarial__weight": 1.0},
     "pretrain.adversarial.weight = 1.0: the language adversary needs at least two languages"),
    ("pretrain", {"pretrain__objectives": {"mlm": INF, "tlm": 1.0}}, "pretrain.objectives.mlm = inf: an objective's "
                                                                     "weight must be a finite number"),
    ("pretrain", {"pretrain__optimizer__betas": [1.5, 0.98]}, "pretrain.optimizer.betas[0] = 1.5: Input should be "
                                                              "less than 1"),
    ("pretrain", {"pretrain__optimizer__lr": NAN}, "pretrain.optimizer.lr = nan: must be a finite number"),
    ("pretrain", {"pretrain__masking__smoothing": 0.5}, "pretrain.masking.smoothing = 0.5: frequency-smoothed"),
    ("download", {"download__timeout_s": INF}, "download.timeout_s = inf: must be a finite number"),
    ("download", {"download__backoff_s": INF}, "download.backoff_s = inf: must be a finite number"),
    ("export", {"export__license": "mit\nbase_model: evil"}, "export.license = 'mit\\nbase_model: evil': must be one "
                                                             "line"),
    ("export", {"export__name": "x" * 1_000_000}, "export.name = 'xxx"),
    ("pretrain", {"pairs": ["en-xx"]}, "params.yaml: pairs: 'en-xx' uses 'xx', which is not in languages"),
    ("download", {"download__sources": SHIPPED["download"]["sources"] + SHIPPED["download"]["sources"][:1]},
     f"download.sources[{len(SHIPPED['download']['sources'])}].name = 'bible': source names must be unique "
     "(sources[0] has it too)"),
    ("download", {"download__sources": [{"name": "x", "kind": "url", "url": "ftp://h/x.txt", "languages": ["en"]}]},
     "download.sources[0].url = 'ftp://h/x.txt': unsupported scheme 'ftp'"),
    ("download", {"download__sources": [{"name": "x", "kind": "url", "urls": {"en": "ftp://h/x.txt"},
                                         "languages": ["en"]}]},
     "download.sources[0].urls.en = 'ftp://h/x.txt': unsupported scheme 'ftp'"),
    ("pretrain", {"pretrain__objectives": {"mlm": 0.0, "tlm": 0.0}},
     "pretrain.objectives: at least one of mlm, tlm, clm, tr needs a weight > 0"),
])
def test_a_bad_value_is_one_line_at_its_key(tmp_path, section, change, expected):
    message = refusal(tmp_path, section, mutated(**change))
    assert expected in message
    assert " = {" not in message                     # never a dump of the mapping with an empty key path
    if "x" * 100 in str(change):
        assert "(1000002 characters)" in message and len(message) < 300


def test_params_file_encoding_and_emptiness_are_one_line(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    assert "byte 0xff at offset" in refusal(tmp_path, "export", raw=text.encode().replace(b"apache-2.0", b"apache\xff"))
    assert "looks like UTF-16 (byte-order mark); convert it to UTF-8" in refusal(tmp_path, "export",
                                                                               raw=text.encode("utf-16"))
    assert "the file is empty" in refusal(tmp_path, "export", raw=b"")
    both = copy.deepcopy(SHIPPED)
    both[1] = 2
    both["zz"] = 3
    assert "unknown top-level key '1'" in refusal(tmp_path, "export", both)


# ------------------------------------------------------------------------------------------ property-based mutations
def _paths(node, prefix=()):
    """Every key path of the shipped params (dict keys and list indices)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


SHARED = ("languages", "pairs")
# Each section's validation reads only the shared keys and that section: the fuzzed file holds just those (small
# files keep 500 examples per section fast), plus an unknown top-level key now and then.
PATHS = {section: sorted((p for p in _paths(SHIPPED) if p[0] in (section, *SHARED)), key=str) for section in SECTIONS}
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.just("x" * 5000), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), st.just({}), st.just([]))


def _apply(params: dict, path: tuple, op: str, value) -> None:
    node = params
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if op == "delete" and isinstance(node, dict):
        del node[last]
    elif op == "extra" and isinstance(node, dict):
        node[f"{last}_extra"] = value
    else:
        node[last] = value


@pytest.mark.parametrize("section", sorted(SECTIONS))
@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_mutations_are_accepted_or_one_line(tmp_path_factory, section, data):
    params = copy.deepcopy({key: SHIPPED[key] for key in (section, *SHARED)})
    if data.draw(st.integers(0, 9)) == 0:
        params[data.draw(st.sampled_from(["zz", 1, "Pretrain"]))] = data.draw(JUNK)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(PATHS[section]))
        try:
            _apply(params, path, data.draw(st.sampled_from(["set", "delete", "extra"])), data.draw(JUNK))
        except (KeyError, IndexError, TypeError):
            pass              # an earlier mutation removed or replaced this path's parent
    path = tmp_path_factory.getbasetemp() / f"fuzz-{section}.yaml"
    path.write_text(yaml.dump(params, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), allow_unicode=True))
    try:
        load_params(section, path)
    except XLMError as exc:   # anything else (a traceback in a stage) fails the test
        message = str(exc)
        assert "\n" not in message and len(message) <= 400, message[:600]
