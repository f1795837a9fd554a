"""Training phases: objective and domain mix switch mid-run; resuming across the switch is bit for bit."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moelab.config import ConfigError
from moelab.data.config import DataConfig
from moelab.data.shards import load_corpus
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.loop import train
from moelab.train.phases import PhasedSampler, parse_phases

from .conftest import tiny_model

SWITCH = [{"start": 0, "objective": "ul2", "weights": {"code": 0.52, "prose": 0.48}},
          {"start": 3, "objective": "causal", "weights": {"code": 0.15, "prose": 0.85}}]


def data(corpus_dir, batch_size=4):
    return DataConfig(path=str(corpus_dir), seq_len=32, batch_size=batch_size)


def row_domains(batch):
    """The domain of each row (its first token's; windows stay inside one domain's documents)."""
    return batch["domain_id"][:, 0].tolist()


def test_each_step_reads_its_phase(corpus_dir):
    names = load_corpus(corpus_dir).domains
    code, prose = names.index("code"), names.index("prose")
    phases = parse_phases([{"start": 0, "weights": {"code": 1}}, {"start": 2, "objective": "ul2",
                                                                 "weights": {"prose": 1, "code": 0}}])
    s = PhasedSampler(data(corpus_dir), phases)
    for step in (0, 1):
        b = s.batch(step)
        assert set(b["domain_id"].flatten().tolist()) == {code} and "denoiser" not in b
    for step in (2, 3, 7):
        b = s.batch(step)
        dom = b["domain_id"][b["domain_id"] >= 0]
        assert set(dom.tolist()) == {prose} and "denoiser" in b  # weight 0: code never drawn


def test_domain_weights_set_the_row_shares(corpus_dir):
    names = load_corpus(corpus_dir).domains
    s = PhasedSampler(data(corpus_dir, batch_size=50), parse_phases([{"weights": {"code": 0.8, "prose": 0.2}}]))
    rows = np.array([d for step in range(20) for d in row_domains(s.batch(step))])
    share = float((rows == names.index("code")).mean())
    assert abs(share - 0.8) < 4 * np.sqrt(0.8 * 0.2 / len(rows))  # binomial: 1000 rows


@pytest.mark.parametrize("phases,message", [
    ([{"start": 2}], "train.phases[0].start=2 must be 0"),
    ([{"start": 0}, {"start": 0}], "train.phases[1].start=0 must be after"),
    ([{"start": 0, "objective": "prefix"}], "train.phases[0].objective='prefix' is not one of"),
    ([{"start": 0, "weights": {"code": -1}}], "weights.code=-1 must be a finite number >= 0"),
    ([{"start": 0, "mix": 1}], "unknown config key train.phases[0].mix"),
    (["causal"], "train.phases[0]='causal' should be a table"),
])
def test_bad_phases_name_the_field(phases, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(phases=phases)
    assert message in str(e.value)


def test_unknown_domain_is_named(corpus_dir):
    with pytest.raises(ConfigError, match="domain 'math', which corpus"):
        PhasedSampler(data(corpus_dir), parse_phases([{"weights": {"math": 1}}]))


def run_cfg(corpus_dir, phases, **kw):
    return RunConfig(model=tiny_model(kind="linear"), data=data(corpus_dir),
                     train=TrainConfig(steps=6, lr=3e-3, warmup_steps=2, eval_tokens=256, tensorboard=False,
                                       phases=phases, **kw))


def test_resume_across_the_switch_is_bit_for_bit(corpus_dir, tmp_path):
    full = train(run_cfg(corpus_dir, SWITCH), tmp_path / "full", show_progress=False)
    train(run_cfg(corpus_dir, SWITCH, save_every=3), tmp_path / "half", show_progress=False)
    boundary = tmp_path / "half" / "checkpoints" / "step_000003"
    resumed = train(run_cfg(corpus_dir, SWITCH), tmp_path / "resumed", resume_from=boundary,
                    show_progress=False)
    assert resumed.losses == full.losses[3:]
    a, b = (load_file(str(r.final_checkpoint / "model.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the switch is real: without it the same seed trains other weights
    plain = train(run_cfg(corpus_dir, []), tmp_path / "plain", show_progress=False)
    c = load_file(str(plain.final_checkpoint / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
