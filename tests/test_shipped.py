"""The model shipped in weights/: it loads from the installed package and draws real digits."""

import torch

from diffgen import pipeline
from diffgen.device import Precision
from diffgen.judge import load_judge, predict
from diffgen.sampling import SamplerConfig


def test_shipped_model_draws_the_digits_asked_for():
    cpu = torch.device("cpu")
    loaded = pipeline.load(None, cpu)
    assert loaded.path == pipeline.default_weights()
    assert loaded.num_classes == 10 and loaded.config.image_size == (28, 28)
    labels = pipeline.class_labels(loaded, [], 2)  # 0, 0, 1, 1, ..., 9, 9
    samples = pipeline.generate(loaded, labels, pipeline.seeds_for(0, len(labels)),
                                SamplerConfig("ddim", 20), cpu, Precision("fp32"), 20)
    assert samples.shape == (20, 1, 28, 28)
    assert samples.min() >= -1 and samples.max() <= 1
    predicted = predict(load_judge(), samples)
    # The shipped model's DDIM-50 samples are judged right 97.4% of the time; 20 draws at
    # 20 steps must get at least 18 right.
    assert int((predicted == torch.tensor(labels)).sum()) >= 18, predicted.tolist()


def test_shipped_model_raw_and_ema_weights_differ():
    cpu = torch.device("cpu")
    ema, raw = pipeline.load(None, cpu), pipeline.load(None, cpu, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(ema.model.state_dict().values(),
                                                     raw.model.state_dict().values()))
