"""posttrain/start_up_check.py: one start-up check per device, whatever the device is called."""

from __future__ import annotations

import logging

import torch

from posttrain.start_up_check import decided_once, device_key, passed_on


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    """torch.device("cuda") and a tensor's cuda:0 share one key (a test or a caller naming "cuda" must not make
    the check run again on cuda:0); other devices keep their names."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert device_key("cuda") == device_key(torch.device("cuda", 0)) == "cuda:0"
    assert device_key("cuda:1") == "cuda:1" and device_key("cpu") == "cpu"


def test_a_check_runs_once_per_device_and_a_failure_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    runs, results = [], {}

    def check(device):
        runs.append(str(device))
        return None if device.index == 0 else "wrong numbers"

    log = logging.getLogger("test_start_up_check")
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert passed_on(torch.device("cuda"), results, check, "kernel", "eager ops run", log)
        assert passed_on(torch.device("cuda", 0), results, check, "kernel", "eager ops run", log)
        assert not passed_on(torch.device("cuda", 1), results, check, "kernel", "eager ops run", log)
        assert not passed_on(torch.device("cuda", 1), results, check, "kernel", "eager ops run", log)
    assert runs == ["cuda:0", "cuda:1"]
    assert [r.getMessage() for r in caplog.records] == [
        "kernel failed its start-up check on cuda:1 (wrong numbers); eager ops run"]


def test_a_fast_path_is_decided_once_per_device_and_kept(monkeypatch):
    """The FP8 GEMMs' and grouped experts' availability: the decision (a capability query, a probe) runs the first
    time a device is seen, under the same key for "cuda" and cuda:0; a prefix keeps two kernels apart."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked, results = [], {}

    def decide(answer):
        return lambda: asked.append(answer) or answer

    assert decided_once(results, "cuda", decide(True)) is True
    assert decided_once(results, torch.device("cuda", 0), decide(False)) is True  # kept, not decided again
    assert decided_once(results, "cuda:0", decide(False), prefix="triton ") is False
    assert decided_once(results, "cuda:0", decide(True), prefix="triton ") is False
    assert asked == [True, False]
    assert results == {"cuda:0": True, "triton cuda:0": False}
