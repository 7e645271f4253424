"""A classifier trained on the real digits grades the drawings: an RBF support-vector machine on the
64 ink values (95% right on the last 297 real digits when trained on the rest), the standard scikit-learn digits example."""

from __future__ import annotations

import torch

from .data import real_digits, require_scikit_learn, to_ink
from . import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from .draw import draw_digits
from .model import NUM_CLASSES, DigitsNet


def train_judge(held_out: int = 0):
    """(the fitted classifier, its accuracy on the last `held_out` real digits, None when 0)."""
    require_scikit_learn()
    from sklearn.svm import SVC

    images, labels = real_digits()
    features = to_ink(images).flatten(1).numpy()
    split = len(features) - held_out
    classifier = SVC(gamma=0.001).fit(features[:split], labels[:split].numpy())
    accuracy = None if not held_out else float((classifier.predict(features[split:]) == labels[split:].numpy()).mean())
    return classifier, accuracy


def classify(classifier, drawings: torch.Tensor) -> torch.Tensor:
    """(B,) the classifier's digit for each (B, 1, 8, 8) drawing in [-1, 1]."""
    return torch.as_tensor(classifier.predict(to_ink(drawings).flatten(1).numpy()))


def agreement(net: DigitsNet, per_digit: int = 10, seed: int = 0, guidance_scale: float = DEFAULT_GUIDANCE,
              steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, classifier=None) -> dict[int, float]:
    """{digit: the fraction of its `per_digit` drawings the classifier reads as that digit}."""
    classifier = classifier or train_judge()[0]
    digits = [d for d in range(NUM_CLASSES) for _ in range(per_digit)]
    predicted = classify(classifier, draw_digits(net, digits, seed, guidance_scale, steps, sampler))
    wanted = torch.tensor(digits)
    return {d: float((predicted[wanted == d] == d).float().mean()) for d in range(NUM_CLASSES)}
