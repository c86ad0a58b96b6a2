"""A digits classifier that takes `seconds` over a batch whose first pixel is exactly 123: a request that
outlasts serve.request_timeout_s, on demand (tests/test_commands_leave_nothing.py)."""
import time

from torch import nn


class SlowOnDemand(nn.Module):
    def __init__(self, classes: int, seconds: float):
        super().__init__()
        self.head = nn.Linear(64, classes)
        self.seconds = seconds

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        if len(x) and bool((x[:, 0] == 123).any()):
            time.sleep(self.seconds)
        return self.head(x)


def build(meta, seconds: float = 6.0):
    return SlowOnDemand(meta.num_classes, seconds)
