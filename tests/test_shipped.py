"""The model shipped in weights/: it loads from the installed package and draws real digits."""

import torch

from diffgen import pipeline
from diffgen.device import Precision
from diffgen.judge import load_judge, predict
from diffgen.sampling import Guidance, SamplerConfig


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


def test_shipped_classifier_reads_digits_through_the_noise():
    from diffgen.training import accuracy_by_timestep
    from diffgen.quality import held_out_digits

    cpu = torch.device("cpu")
    loaded = pipeline.load(None, cpu)
    classifier = pipeline.load_classifier(None, loaded, cpu)
    real = held_out_digits()  # digits 8000..9999, which the classifier never trained on
    accuracy = accuracy_by_timestep(classifier, loaded.diffusion, real.images[:500],
                                    real.labels[:500], [0, 500, 999], cpu, Precision("fp32"))
    # On all 2,000 the model card has 0.9925 at t = 0 and 0.6845 at t = 500 (these 500 give
    # 0.996 and 0.686); at t = 999 the image is all but pure noise (sqrt(ᾱ) = 0.006) and the
    # classifier is near chance (0.134 here).
    assert accuracy[0] >= 0.98
    assert accuracy[500] >= 0.60
    assert accuracy[999] <= 0.20


def test_guidance_on_the_shipped_models_keeps_to_the_class():
    cpu = torch.device("cpu")
    loaded = pipeline.load(None, cpu)
    classifier = pipeline.load_classifier(None, loaded, cpu)
    labels = [2] * 20  # the class the unguided model gets wrong most often
    seeds = pipeline.seeds_for(0, 20)
    judge = load_judge()
    for guidance in (Guidance(classifier, 1.0), Guidance(cfg_scale=2.0),
                     Guidance(classifier, 5.0, unconditional=True)):
        samples = pipeline.generate(loaded, labels, seeds, SamplerConfig("ddim", 20), cpu,
                                    Precision("fp32"), 20, guidance=guidance)
        right = int((predict(judge, samples) == 2).sum())
        assert right >= 19, (guidance, right)
