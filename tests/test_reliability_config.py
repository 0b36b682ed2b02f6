"""Reliability of the config loader: fed random YAML documents and dotted overrides, it only ever succeeds or
raises InputError."""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmd4rec.config import Config, load_config
from llmd4rec.errors import InputError

SECTIONS = {f.name: f for f in Config.__dataclass_fields__.values()}
DOTTED = sorted([name for name in SECTIONS if not hasattr(getattr(Config(), name), "__dataclass_fields__")] +
                [f"{name}.{sub}" for name in SECTIONS if hasattr(getattr(Config(), name), "__dataclass_fields__")
                 for sub in getattr(Config(), name).__dataclass_fields__])
KEYS = st.one_of(st.sampled_from(sorted({k.split(".")[-1] for k in DOTTED} | set(SECTIONS))), st.text(max_size=8))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.binary(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
# documents shaped like configs: known sections with known or random keys, and random values
DOCS = st.one_of(VALUES, st.dictionaries(KEYS, st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=5)),
                                         max_size=6))
YAML_TEXT = st.text(alphabet=string.printable + "\u00e9\u4e2d\x00\ufeff", max_size=80)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# values whose YAML constructor fails with ValueError/KeyError instead of yaml.YAMLError: a malformed tag, or a
# plain scalar that looks like a date but is not one (run_name=2020-02-30)
BAD_YAML = ["!!float x", "!!int x", "!!bool x", "!!timestamp 2020-13-45", "2020-02-30", "2021-1-1 25:00:00"]


def _load_or_input_error(path=None, overrides=None) -> None:
    try:
        cfg = load_config(path, overrides)
    except InputError as e:
        assert str(e)
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(doc=DOCS)
def test_random_yaml_documents_load_or_raise_input_error(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load_or_input_error(path)


@FUZZ
@given(text=st.one_of(YAML_TEXT, st.builds("{}: {}\n  {}: {}".format, KEYS, st.sampled_from(["", *BAD_YAML]),
                                           KEYS, YAML_TEXT)))
def test_random_yaml_text_loads_or_raises_input_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8"))
    _load_or_input_error(path)


@FUZZ
@given(text=st.binary(max_size=60))
def test_random_bytes_as_config_load_or_raise_input_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text)
    _load_or_input_error(path)


@FUZZ
@given(overrides=st.lists(st.tuples(st.one_of(st.sampled_from(DOTTED), st.text(max_size=15)),
                                    st.one_of(YAML_TEXT, st.sampled_from(BAD_YAML),
                                              SCALARS.map(lambda v: yaml.safe_dump(v).strip()))),
                          max_size=4),
       plain=st.lists(st.text(max_size=10), max_size=2))
def test_random_dotted_overrides_apply_or_raise_input_error(overrides, plain):
    _load_or_input_error(None, [f"{k}={v}" for k, v in overrides] + plain)


@pytest.mark.parametrize("value", BAD_YAML)
def test_malformed_yaml_values_in_overrides_are_input_errors(value):
    _load_or_input_error(None, [f"run_name={value}"])


@pytest.mark.parametrize("value", BAD_YAML)
def test_malformed_yaml_values_in_files_are_input_errors(tmp_path, value):
    (tmp_path / "c.yaml").write_text(f"run_name: {value}\n")
    _load_or_input_error(tmp_path / "c.yaml")


def test_config_path_that_is_a_folder_is_an_input_error(tmp_path):
    _load_or_input_error(tmp_path)
