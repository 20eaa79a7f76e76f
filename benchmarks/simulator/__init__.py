"""A discrete-event simulator of a prefill/decode cluster, calibrated from component benchmarks."""
