"""PNG plots of the simulator's results (matplotlib, Agg; imported only when asked for)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.loadgen.plots import _pyplot, _save


def plot_sweep(rows: list[dict], best: list[dict], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for slo in sorted({b["slo"] for b in best}):
        pts = [(b["num_gpus"], b["arrival_rate"]) for b in best
               if b["slo"] == slo and b["arrival_rate"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=slo)
    ax.set(xscale="log", yscale="log", xlabel="H200 GPUs", ylabel="highest rate meeting SLO (req/s)",
           title="long-context workload: capacity of the best P:D / SP config")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    paths.append(_save(fig, out_dir / "simulator_sweep_capacity.png"))

    g = min(r["num_gpus"] for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["num_prefill_groups"], r["sp"], r["num_decode"])
                       for r in rows if r["num_gpus"] == g}):
        pts = sorted((r["arrival_rate"], r["ttft_p99_s"]) for r in rows
                     if r["num_gpus"] == g and (r["num_prefill_groups"], r["sp"],
                                                r["num_decode"]) == key and r["ttft_p99_s"])
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]}x SP{key[1]} + {key[2]} decode")
    ax.set(yscale="log", xlabel="arrival rate (req/s)", ylabel="TTFT p99 (s)",
           title=f"{g} H200s: TTFT p99 vs rate per configuration")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / f"simulator_sweep_{g}gpu.png"))
    return paths


def plot_routing(rows: list[dict], out_dir: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["policy"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ttft_p50_s"] for r in rows], 0.4, label="TTFT p50")
    ax.bar([i + 0.2 for i in x], [r["ttft_p99_s"] for r in rows], 0.4, label="TTFT p99")
    ax.set_xticks(list(x), names)
    ax.set(ylabel="seconds", title="routing on 4P + 4D H200s (simulated)")
    ax.legend()
    return _save(fig, out_dir / "routing.png")


def plot_validation(rows: list[dict], out_dir: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['setup']}\n{r['arrival_rate']:g}/s" for r in rows]
    x = range(len(rows))
    for off, key, label in ((-0.3, "measured_mean_ttft_s", "measured mean"),
                            (-0.1, "simulated_mean_ttft_s", "simulated mean"),
                            (0.1, "measured_p90_ttft_s", "measured p90"),
                            (0.3, "simulated_p90_ttft_s", "simulated p90")):
        ax.bar([i + off for i in x], [r[key] for r in rows], 0.2, label=label)
    ax.set_xticks(list(x), labels)
    ax.set(yscale="log", ylabel="TTFT (s)", title="simulator vs measured (end-to-end runs)")
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "simulator_validation.png")
