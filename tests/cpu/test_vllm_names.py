"""`engine.vllm_name`: the vLLM objects this app uses, wherever this vLLM keeps them (the CPU
build here is 0.32, the GPU box's is 0.26, and four of them moved in between)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from serve_app import engine
from serve_app.engine import VLLM_NAMES, vllm_name


def test_every_name_resolves_in_this_vllm() -> None:
    for name in VLLM_NAMES:
        assert getattr(vllm_name(name), "__name__", None) == name


def test_a_missing_module_is_skipped_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(engine.VLLM_NAMES, "dumps", ("serve_app.no_such_module", "json"))
    assert vllm_name("dumps") is json.dumps


def test_a_module_whose_dependency_is_missing_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What the GPU box showed: a module that exists but cannot import must not be passed over
    # for an older path; the error names the missing dependency.
    (tmp_path / "pd_broken_module.py").write_text("import pd_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(engine.VLLM_NAMES, "dumps", ("pd_broken_module", "json"))
    with pytest.raises(ModuleNotFoundError, match="pd_no_such_dependency"):
        vllm_name("dumps")
    sys.modules.pop("pd_broken_module", None)


def test_a_name_no_module_has_is_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(engine.VLLM_NAMES, "dumps", ("serve_app.no_such_module",))
    with pytest.raises(ImportError, match="dumps: none of"):
        vllm_name("dumps")
