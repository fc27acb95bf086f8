"""``ppo.async_rollout`` (issue 16.5): the config key and the pure helpers of
``rlhf.workers.async_rollout`` (staleness arithmetic, JSON round trip of a pending batch), hand-checked."""

from __future__ import annotations

import json

import pytest

from rlhf.config import ConfigError, load_config
from rlhf.engines.base import Generation
from rlhf.workers.async_rollout import (PENDING_FILE, Pending, actor_updates, gens_from_json, gens_to_json,
                                        load_pending, save_pending, staleness)


def test_async_rollout_key_default_off_and_checked():
    assert load_config(None, []).ppo.async_rollout is False
    cfg = load_config(None, ["ppo.async_rollout=true", "ppo.tis_cap=2.0"])
    assert cfg.ppo.async_rollout is True and cfg.ppo.tis_cap == 2.0
    with pytest.raises(ConfigError, match=r"^ppo\.tis_cap: must be set with ppo\.async_rollout"):
        load_config(None, ["ppo.async_rollout=true"])
    with pytest.raises(ConfigError, match=r"^ppo\.async_rollout: needs ppo\.old_logp_source: trainer"):
        load_config(None, ["ppo.async_rollout=true", "ppo.old_logp_source=rollout", "ppo.mismatch_sample_rows=4"])
    with pytest.raises(ConfigError, match=r"^ppo\.async_rollout"):
        load_config(None, ["ppo.async_rollout=maybe"])


def test_staleness_counts_actor_updates():
    # no warm-up: the batch for step t+1 is launched during step t, after t actor updates; the
    # trainer has t+1 by then -> 1.  Step 0 (generated synchronously, version 0) -> 0.
    assert [actor_updates(s, 0) for s in range(4)] == [0, 1, 2, 3]
    assert staleness(0, 0, 0) == 0
    assert [staleness(t + 1, actor_updates(t, 0), 0) for t in range(4)] == [1, 1, 1, 1]
    # critic warm-up of 2 steps: steps 0 and 1 train only the critic, so the batches of steps 1
    # and 2 come from the same (initial) weights as the trainer's; step 3's is one update behind
    assert [actor_updates(s, 2) for s in range(5)] == [0, 0, 0, 1, 2]
    assert [staleness(t + 1, actor_updates(t, 2), 2) for t in range(4)] == [0, 0, 1, 1]


def test_pending_batch_round_trips_exactly(tmp_path):
    gens = [Generation([1, 2, 3], [7, 8, 2], [-0.1234567890123, -1e-9, -3.5], True, {"finish_reason": "stop"}),
            Generation([4], [9], [-2.0000000000000004], False)]
    rows = gens_to_json(gens)
    assert gens_from_json(json.loads(json.dumps(rows))) == gens

    class State:
        pending = Pending(step=3, version=2, gens=gens)

    class Cfg:
        class ppo:
            async_rollout = True

    save_pending(State, tmp_path)
    assert json.loads((tmp_path / PENDING_FILE).read_text())["step"] == 3
    back = load_pending(Cfg, tmp_path)
    assert (back.step, back.version, back.gens, back.ref) == (3, 2, gens, None)
    Cfg.ppo.async_rollout = False
    assert load_pending(Cfg, tmp_path) is None               # async off: the file is not read
    Cfg.ppo.async_rollout = True
    with pytest.raises(ConfigError, match="pending_rollout.json does not exist"):
        load_pending(Cfg, tmp_path / "nowhere")
    (tmp_path / PENDING_FILE).write_text("{\"step\": 1}")
    with pytest.raises(ConfigError, match="is not a pending rollout batch"):
        load_pending(Cfg, tmp_path)
