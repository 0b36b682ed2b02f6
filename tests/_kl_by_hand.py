"""The softmax and KL divergence worked out in plain Python floats: the by-hand reference that the KL-term and the
teacher-cache tests both check against."""

import math


def _softmax(xs, T):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


def _hand_kl(student, teacher, T):
    ps, pt = _softmax(student, T), _softmax(teacher, T)
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
