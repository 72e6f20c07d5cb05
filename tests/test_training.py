"""EMA, checkpoints, exact resume, NaN guard and data order (CASES E1-E4, P2, R2)."""

import logging

import pytest
import torch

from conftest import make_trainer
from diffgen import checkpoint, pipeline
from diffgen.ema import ema_decay
from diffgen.errors import DiffgenError
from diffgen.training import BatchSampler
from diffgen.unet import UNet, UNetConfig


def test_ema_warm_up():  # E1
    assert 0.9999 ** 10_000 == pytest.approx(0.368, abs=1e-3)
    assert ema_decay(10, 0.9999) == pytest.approx(0.55)
    assert ema_decay(10_000, 0.9999) == pytest.approx(0.99910, abs=1e-5)
    assert ema_decay(10 ** 7, 0.9999) == 0.9999


def params_of(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_saving_and_sampling_leave_training_weights_alone(few_digits, tmp_path):  # E2
    trainer = make_trainer(few_digits, tmp_path, steps=2)
    trainer.run()
    before = params_of(trainer)
    trainer.save()
    loaded = pipeline.load(trainer.model_path, torch.device("cpu"), ema=True)
    pipeline.generate(loaded, [1], [0], pipeline.SamplerConfig("ddim", 2), torch.device("cpu"),
                      trainer.precision, 1)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt = checkpoint.load_model(trainer.model_path)
    raw = pipeline.load(trainer.model_path, torch.device("cpu"), ema=False)
    for name, tensor in raw.model.state_dict().items():
        assert torch.equal(tensor, ckpt.params[name])
        assert torch.equal(loaded.model.state_dict()[name], ckpt.ema[name])
    assert any(not torch.equal(ckpt.params[k], ckpt.ema[k]) for k in ckpt.params)


def test_resume_is_exact(few_digits, tmp_path):  # E3
    data = type(few_digits)(few_digits.images[:8], few_digits.labels[:8],
                            few_digits.class_names, "8 digits")
    run_a = make_trainer(data, tmp_path / "a", steps=4, batch_size=4)
    run_a.run()
    first = make_trainer(data, tmp_path / "b", steps=2, batch_size=4)
    first.run()
    run_b = make_trainer(data, tmp_path / "b", steps=4, batch_size=4)
    run_b.resume()
    assert run_b.step == 2
    run_b.run()
    assert run_b.step == run_a.step == 4
    for name, tensor in run_a.model.state_dict().items():
        assert torch.equal(tensor, run_b.model.state_dict()[name]), name
        assert torch.equal(run_a.ema.shadow[name], run_b.ema.shadow[name]), name
    state_a, state_b = run_a.optimizer.state_dict(), run_b.optimizer.state_dict()
    for index, entry in state_a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)
    assert state_a["param_groups"][0]["lr"] == state_b["param_groups"][0]["lr"]
    assert run_a.scaler.state_dict() == run_b.scaler.state_dict()
    assert checkpoint.load_model(run_b.model_path).step == 4


def test_checkpoint_metadata_and_mismatch(few_digits, tmp_path, tiny_config):  # E4
    trainer = make_trainer(few_digits, tmp_path, steps=1)
    trainer.run()
    ckpt = checkpoint.load_model(trainer.model_path)
    assert UNetConfig.from_dict(ckpt.model_config) == tiny_config
    assert ckpt.step == 1 and ckpt.train_config["steps"] == 1
    result = UNet(tiny_config).load_state_dict(ckpt.params, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    other = UNet(UNetConfig(**{**tiny_config.to_dict(), "base_channels": 16}))
    with pytest.raises(DiffgenError, match="tensor 'time_embed.0.weight' has shape"):
        checkpoint.load_weights_into(other, ckpt.params, "test")
    bigger = UNet(UNetConfig(**{**tiny_config.to_dict(), "num_res_blocks": 2}))
    with pytest.raises(DiffgenError, match="is missing"):
        checkpoint.load_weights_into(bigger, ckpt.params, "test")


def test_aliased_tensors_are_saved_as_distinct(tmp_path):  # E4
    shared = torch.arange(4.0)
    checkpoint.atomic_save({"a": shared, "b": shared, "c": shared[:2]}, {}, tmp_path / "x.st")
    tensors, _ = checkpoint.read_safetensors(tmp_path / "x.st")
    assert torch.equal(tensors["b"], shared) and torch.equal(tensors["c"], shared[:2])


def test_a_crash_mid_write_keeps_the_old_file(few_digits, tmp_path, monkeypatch):
    trainer = make_trainer(few_digits, tmp_path, steps=1)
    trainer.run()
    good = trainer.model_path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(DiffgenError, match="No space left"):
        trainer.save()
    assert trainer.model_path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "log.jsonl", "model.safetensors", "train_state.safetensors"]


def test_one_nan_is_skipped_and_a_run_of_them_stops(few_digits, tmp_path, monkeypatch,
                                                    caplog):  # P2
    trainer = make_trainer(few_digits, tmp_path, steps=20, checkpoint_every=2,
                           max_nan_steps=3)
    forward = trainer.model.forward
    bad_steps = {3} | set(range(6, 20))

    def flaky(x_t, t, y=None):
        out = forward(x_t, t, y)
        return out * float("nan") if trainer.step in bad_steps else out

    monkeypatch.setattr(trainer.model, "forward", flaky)
    with caplog.at_level(logging.WARNING), pytest.raises(DiffgenError) as err:
        trainer.run()
    assert "3 consecutive non-finite losses ending at step 8" in str(err.value)
    assert "step 3: non-finite loss, step skipped" in caplog.text
    ckpt = checkpoint.load_model(trainer.model_path)
    assert ckpt.step == 6
    assert all(torch.isfinite(v).all() for v in ckpt.params.values())


def test_batches_are_a_function_of_seed_and_step(few_digits):  # R2
    make = lambda seed: BatchSampler(few_digits, 8, 1000, seed, 0.1, 10)  # noqa: E731
    a, b, c = make(0), make(0), make(1)
    for step in (0, 3, 5, 3):  # any order, as a resumed run asks for them
        for x, y in zip(a.draw(step), b.draw(step)):
            assert torch.equal(x, y)
    assert not torch.equal(a.draw(0)[2], c.draw(0)[2])
    epoch = torch.cat([a.draw(s)[0] for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(32))  # one epoch visits every image once


def test_class_dropout_uses_the_null_class(digits):
    sampler = BatchSampler(digits, 1000, 1000, 0, 0.1, 10)
    labels = sampler.draw(0)[3]
    assert 60 < int((labels == 10).sum()) < 140  # 10% of 1000
