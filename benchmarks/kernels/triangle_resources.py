"""Resource report of the compiled Triangle kernel (registers, spills, shared memory, wgmma).

    python benchmarks/kernels/triangle_resources.py     # on the GPU machine
"""

from __future__ import annotations

import torch
from disagg_kernels.triangle_mix.kernel import _triangle_fwd
from disagg_kernels.triangle_mix.launcher import triangle_attention_triton


def main() -> None:
    for hq, hkv, d in [(32, 8, 128), (9, 3, 64)]:
        q, k, v = (torch.randn(8192, h, d, device="cuda", dtype=torch.bfloat16)
                   for h in (hq, hkv, hkv))
        triangle_attention_triton(q, k, v, num_tokens=8192)
    torch.cuda.synchronize()
    for dev_cache in _triangle_fwd.device_caches.values():
        for kernel in dev_cache[0].values():
            ptx = kernel.asm.get("ptx", "")
            print(f"{kernel.name}: regs={kernel.n_regs} spills={kernel.n_spills} "
                  f"shared={kernel.metadata.shared} warps={kernel.metadata.num_warps} "
                  f"stages={kernel.metadata.num_stages} wgmma={ptx.count('wgmma.mma_async')} "
                  f"mma.sync={ptx.count('mma.sync')} cp.async={ptx.count('cp.async')}")


if __name__ == "__main__":
    main()
