"""The router's fitted cost models (written by ``python -m benchmarks.fit_cost_model
--write`` from the measured ``benchmarks/results/*.json``; a test re-fits and compares).
Each model's ``source`` names the files it was fitted from."""

from __future__ import annotations

from disagg.cost_model import CostModel, DecodeCost, ModelShape, PrefillCost, TransferCost


def cpu_default() -> CostModel:
    return (
        CostModel(prefill=PrefillCost(fixed_s=0.01999069402994802,
                                      per_token_s=0.0024570501298405373,
                                      per_token2_s=0.0,
                                      triangle_per_token_s=0.0),
                  decode=DecodeCost(fixed_s=0.09452224732753842,
                                    per_seq_s=0.00482986210026952,
                                    per_context_token_s=0.0),
                  transfers=(TransferCost(backend='object_store',
                                          fixed_s=0.024000671666764607,
                                          s_per_byte=1.214335349751979e-09),),
                  remote_overhead_s=0.09971925099966938,
                  shape=ModelShape(num_layers=30,
                                   hidden_size=576,
                                   intermediate_size=1536,
                                   num_heads=9,
                                   num_kv_heads=3,
                                   head_dim=64),
                  threads=2,
                  sp_efficiency=0.9,
                  sp_per_token_s=0.0,
                  source='CPU fit: benchmarks/results/model_cpu.json, decode_cpu.json, '
                         'routing_cpu.json (2 cores)')
    )


def gpu_default() -> CostModel:
    return (
        CostModel(prefill=PrefillCost(fixed_s=0.009486478338238352,
                                      per_token_s=2.2196447346655544e-05,
                                      per_token2_s=4.0802875493914693e-10,
                                      triangle_per_token_s=9.592784981502357e-07),
                  decode=DecodeCost(fixed_s=0.0048182003451640795,
                                    per_seq_s=9.885456178389142e-06,
                                    per_context_token_s=2.7884356677547734e-08),
                  transfers=(TransferCost(backend='cuda_ipc',
                                          fixed_s=0.001513760500003514,
                                          s_per_byte=0.0),
                             TransferCost(backend='object_store',
                                          fixed_s=0.006635278586252443,
                                          s_per_byte=1.5972698966539997e-10)),
                  remote_overhead_s=0.012028370999992433,
                  shape=ModelShape(num_layers=32,
                                   hidden_size=4096,
                                   intermediate_size=14336,
                                   num_heads=32,
                                   num_kv_heads=8,
                                   head_dim=128),
                  threads=0,
                  sp_efficiency=0.9,
                  sp_per_token_s=0.0,
                  source='GPU fit: benchmarks/results/ttft.json, decode_itl.json, '
                         'kv_handoff.json, serving_overhead.json (one H200)')
    )
