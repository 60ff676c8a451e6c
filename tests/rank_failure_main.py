"""``senseflow train`` in which one rank fails at iteration 1, as torchrun runs it (for test_scale):
``die`` exits the process, ``hang`` sleeps far beyond the process-group timeout; ``sigterm`` (for
test_reliability) sends rank 1 alone a SIGTERM, as a preemption that reaches the ranks unevenly."""

import os
import signal
import sys
import time

from senseflow.cli import main
from senseflow.train.trainer import Distiller

MODE = os.environ["SENSEFLOW_TEST_FAILURE"]
original = Distiller.train_step


def failing_step(self):
    if self.rank == 1 and self.iteration == 1:
        if MODE == "die":
            os._exit(3)
        if MODE == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return original(self)
        time.sleep(3600)
    return original(self)


Distiller.train_step = failing_step
sys.exit(main(sys.argv[1:]))
