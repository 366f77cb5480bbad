"""The messages between the server's front end and the engine process survive the pipe
(pickle) unchanged, and cannot be changed in flight."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from fairbatch.request import SLO, Request
from fairbatch.scheduler.base import Load
from fairbatch.server import engine_messages as m


def test_every_message_pickles_to_an_equal_one():
    req = Request("r1", 0.0, 16, 4, SLO(1.0, 0.05))
    msgs = [m.AbortRequests(("a", "b")), m.LoadQuery(7), m.Stop(), m.EngineFailed("no such model"),
            m.StepDeltas((("a", m.Delta([1, 2], "stop", time=1.5, start=3)),)),
            m.LoadReply(7, Load(1, 2, 0.5, 10, 20, 30, 0.25, 1.0)), m.LoadReply(8, None, "boom"),
            m.SnapshotUpdate(m.EngineSnapshot(running=3, iteration_tokens=(1, 0))), m.LateCounts(2, 1),
            m.LatencyProfile({"kind": "linear"}), m.EngineGone("exited"), m.EngineRevived(1)]
    for msg in msgs:
        assert pickle.loads(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)) == msg
        for f in dataclasses.fields(msg)[:1]:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(msg, f.name, None)
    add = pickle.loads(pickle.dumps(m.AddRequests((req,))))
    assert [r.request_id for r in add.requests] == ["r1"]
