import os

import hypothesis
import jax


# The test process keeps the machine's one CPU device, so `fit`'s default mesh
# (every device) is one device, as on a laptop; runs on several simulated devices
# or processes are subprocesses with their own XLA_FLAGS (tests/test_scale.py).
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile("dev", deadline=None, max_examples=10)
hypothesis.settings.register_profile("thorough", deadline=None, max_examples=200)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
