"""docs/benchmarks/ from the benches' JSON results (bench/results/*.json): one page
per machine and date, and the README's headline table (the block between its
`<!-- headline: RESULT -->` and `<!-- /headline -->` lines, from the result it names).

    python bench/report.py            # rewrite docs/benchmarks/ and the README's table
    python bench/report.py --check    # exit 1 if any of them is not what the results give

tests/test_docs.py runs the check, so the pages cannot drift from their results."""
import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
PAGES = os.path.join(REPO, "docs", "benchmarks")
HEADLINE = re.compile(r"(<!-- headline: (?P<result>\S+) -->\n)(?P<table>.*?)(<!-- /headline -->)", re.S)


MODELS = {"gpt2": "GPT-2 124M", "gpt2-medium": "GPT-2 medium (355M)", "gpt2-large": "GPT-2 large (774M)",
          "gpt2-xl": "GPT-2 XL (1.5B)", "small": "the small default model",
          "smollm2-135m-instruct-q4_1": "SmolLM2-135M-Instruct from its Q4_1 GGUF"}


def machine_name(machine):
    """What a reader recognises: CPU, cores, the features a step's speed turns on."""
    flags = machine.get("cpu_flags", [])
    units = ("AMX" if "amx_bf16" in flags else "AVX512_BF16" if "avx512_bf16" in flags else
             "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{machine['cpu']}, {machine['logical_cpus']} CPUs, {units}"


def slug(machine):
    return re.sub(r"[^a-z0-9]+", "-", machine_name(machine).lower()).strip("-")


def systems_table(result):
    tokens = result["settings"]["batch_size"] * result["settings"]["seq_len"]
    rows = ["| system | s/step (median) | tokens/s | peak memory | raw s/step, by round |",
            "| --- | ---: | ---: | ---: | --- |"]
    for name, system in result["systems"].items():
        peak = f"{system['peak_gb']:.2f} GB" if system.get("peak_gb") else "–"
        raw = " / ".join(" ".join(f"{t:.3f}" for t in rnd) for rnd in system["raw"])
        rows.append(f"| {name} | {system['median_s']:.3f} | {tokens / system['median_s']:,.0f} | {peak} | {raw} |")
    return "\n".join(rows)


def rows_table(rows):
    """A bench's own table: one column per key of its rows."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(value_text(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def value_text(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def headline(result):
    """The README's table: medians, tokens/s and peaks, no raw numbers."""
    settings = result["settings"]
    rows = [f"{MODELS.get(settings['model'], settings['model'])}, B={settings['batch_size']}, T={settings['seq_len']}, on "
            f"{machine_name(result['machine'])}, {result['date']} (`{result['command']}`):", "",
            "| system | s/step | tokens/s | peak memory |", "| --- | ---: | ---: | ---: |"]
    tokens = settings["batch_size"] * settings["seq_len"]
    for name, system in result["systems"].items():
        peak = f"{system['peak_gb']:.2f} GB" if system.get("peak_gb") else "–"
        rows.append(f"| {name} | {system['median_s']:.3f} | {tokens / system['median_s']:,.0f} | {peak} |")
    rows += [""] + [f"- {line}: **{value:.2f}×**" for line, value in result["summary"].items()]
    return "\n".join(rows) + "\n"


def section(result, path):
    settings = result["settings"]
    shape = ", ".join(f"{label}={settings[key]}" for key, label in (("batch_size", "B"), ("seq_len", "T"))
                      if key in settings)
    model = settings.get("model")
    head = f"## {result['bench']}: " + ", ".join(part for part in (MODELS.get(model, model), shape) if part)
    options = "; ".join(f"{key} {value_text(value) if not isinstance(value, list) else ' '.join(value) or '–'}"
                        for key, value in settings.items() if key not in ("model", "batch_size", "seq_len"))
    lines = [head, "", f"`{result['command']}` at commit `{result['commit']}`, {result['date']} {result['time']}; "
             f"result `{os.path.relpath(path, REPO)}`." + (f" Settings: {options}." if options else ""), ""]
    if result["systems"]:
        lines += ["Medians over every round's steps after each process's warm-up; each system in its own "
                  "process, the systems interleaved in rounds; peaks are PSS of all processes (shared memory "
                  "once) in separate untimed runs.", "", systems_table(result), ""]
    if result.get("rows"):
        lines += [rows_table(result["rows"]), ""]
    lines += [f"- {line}: **{value:.2f}×**" for line, value in result["summary"].items()]
    machine = result["machine"]
    lines += ["", f"Software: {', '.join(machine['blas'])}; NumPy {machine['numpy']}; Python {machine['python']}; "
              f"{machine['kernel']}.", ""]
    return "\n".join(lines)


def pages():
    """-> {page path: text} for every machine and date of the results."""
    groups = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        groups[(result["date"], slug(result["machine"]))].append((path, result))
    out = {}
    for (date, name), results in sorted(groups.items()):
        machine = results[0][1]["machine"]
        caches = ", ".join(f"{k} {v}" for k, v in machine.get("caches", {}).items())
        text = [f"# {machine_name(machine)}, {date}", "",
                "Generated by `python bench/report.py` from the results named below; do not edit by hand.", "",
                f"Machine: {machine['cpu']}; {machine['physical_cores']} physical cores, {machine['logical_cpus']} "
                f"logical CPUs, {machine['sockets']} socket(s), {machine['numa_nodes']} NUMA node(s); "
                f"CPU features {', '.join(machine.get('cpu_flags', [])) or 'none of note'}; caches {caches}.", ""]
        text += [section(result, path) for path, result in results]
        out[os.path.join(PAGES, f"{date}-{name}.md")] = "\n".join(text)
    index = ["# Benchmarks", "", "Generated by `python bench/report.py` from `bench/results/`; one page per "
             "machine and date. How they are measured: [../performance.md](../performance.md#the-benches).", ""]
    index += [f"- [{os.path.basename(p)[:-3]}]({os.path.basename(p)})" for p in sorted(out, reverse=True)]
    out[os.path.join(PAGES, "README.md")] = "\n".join(index) + "\n"
    return out


def readme(text):
    """The README with its headline block rebuilt from the result it names."""
    def rebuild(match):
        with open(os.path.join(REPO, match["result"])) as f:
            return match.group(1) + headline(json.load(f)) + match.group(4)
    return HEADLINE.sub(rebuild, text)


def read(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is stale")
    args = ap.parse_args()
    wanted = pages()
    with open(os.path.join(REPO, "README.md")) as f:
        wanted[os.path.join(REPO, "README.md")] = readme(f.read())
    stale = [path for path, text in wanted.items() if read(path) != text]
    extra = set(glob.glob(os.path.join(PAGES, "*.md"))) - set(wanted)
    if args.check:
        for path in stale + sorted(extra):
            print(f"stale: {os.path.relpath(path, REPO)} (run python bench/report.py)")
        return 1 if stale or extra else 0
    os.makedirs(PAGES, exist_ok=True)
    for path in stale:
        with open(path, "w") as f:
            f.write(wanted[path])
        print(f"wrote {os.path.relpath(path, REPO)}")
    for path in extra:
        os.remove(path)
        print(f"removed {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
