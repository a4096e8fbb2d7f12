"""posttrain/start_up_check.py: one start-up check per device, whatever the device is called."""

from __future__ import annotations

import logging

import torch

from posttrain.start_up_check import device_key, passed_on


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
