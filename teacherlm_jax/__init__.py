"""teacherlm-jax: train TeacherLM teachers (BLOOM in JAX/Flax) and augment datasets with them."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (used by seqio for data) is otherwise chatty

__version__ = "0.1.0"
