"""QuaRot: rotate the model with Hadamard matrices so no channel carries outliers (Ashkboos et al., arXiv 2404.00456).

Quantizing a vector whose energy sits in a few channels wastes the grid on them; an orthogonal
rotation spreads every outlier over all channels, and a Hadamard one does it for any input. The
rotations that can be folded into weights are (names as in SpinQuant, arXiv 2405.16406):

* R1, a random-sign Hadamard matrix on the residual stream, folded into the embeddings, the linears
  reading and writing the stream and the (untied) lm_head, after the RMSNorm scales are folded away;
* R2, a Hadamard matrix per attention head on values, folded into ``v_proj`` and ``o_proj``.

Two are done online, because a nonlinearity sits between them and any weight:

* R3, a Hadamard transform of queries and keys after RoPE, so the KV cache is quantized rotated;
* R4, a Hadamard transform of the ``down_proj`` input, undone in its weight.

The rotated float model computes the same function (see :mod:`bitsmith.transforms.fold`). Put this
step first; quantization steps (RTN, GPTQ, activations, KV cache) after it act in the rotated basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.registry import Step, register_step
from bitsmith.runtime import kvcache
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.online import OnlineHadamard
from bitsmith.transforms import fold
from bitsmith.transforms.hadamard import hadamard_matrix, hadamard_transform, random_hadamard_matrix


def install_online_rotations(ctx, block, r3: bool, r4: bool) -> None:
    """R4 on the input of the closing linear of each non-attention branch (the MLP's down projection;
    weight compensated) and R3 on queries/keys."""
    ad = ctx.lm.adapter
    if r4:
        for role, kind in fold.rotation_kinds(ad, block).items():
            if kind != fold.CLOSES:
                continue
            down = ad.block_linears(block)[role]
            fold._assign(down, "weight", hadamard_transform(fold._weight(down, "rotate").double()))  # W H^T
            q = QuantLinear.from_linear(down)
            q.input_transform = OnlineHadamard()
            ad.set_block_linear(block, role, q)
    if r3:
        kvcache.configure(ctx.lm.model, ad.attention(block), rotate=True)


@register_step("quarot")
@dataclass
class QuaRot(Step):
    """Recipe step: fold R1/R2 Hadamard rotations, install online R3/R4."""

    seed: int | None = None  # of R1's random signs; defaults to the run's seed
    r2: bool = True
    r3: bool = True
    r4: bool = True

    def prepare(self, ctx) -> None:
        ad = ctx.lm.adapter
        seed = ctx.seed if self.seed is None else self.seed
        self.r1 = random_hadamard_matrix(ad.hidden_size, seed, dtype=torch.float64)
        self.p = hadamard_matrix(ad.head_dim, dtype=torch.float64) if self.r2 else None
        fold.rotate_outside_blocks(ad, self.r1)

    def apply_block(self, ctx, block) -> None:
        fold.rotate_block(ctx.lm.adapter, block, self.r1, self.p)
        install_online_rotations(ctx, block, self.r3, self.r4)
