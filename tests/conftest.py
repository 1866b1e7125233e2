import os

import pytest
import torch

torch.set_num_threads(1)  # several test files run beside each other on a 2-core machine

# Distillation tests compare runs to tight tolerances; they must not depend on whether this CPU has bf16
# instructions (precision 'auto' would turn bf16 autocast on where it does). Inherited by worker processes.
os.environ["LLAMBA_CPU_BF16"] = "0"


@pytest.fixture
def tiny_config():
    from llamba.config import LlambaConfig

    return LlambaConfig(
        vocab_size=101,
        d_model=32,
        n_layer=2,
        intermediate_size=64,
        d_state=8,
        n_v_heads=4,
        n_qk_heads=2,
        chunk_size=8,
    )
