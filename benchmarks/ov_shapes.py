"""How OpenVINO's CPU plugin runs the same IR compiled three ways: a dynamic batch, a static batch (as
`benchmark_app -b 1` compiles it, snippets on), and a static batch with snippets off (this project's runner).

Each IR is timed at batch 1 in all three forms, each in its own worker process, round-robin slices
(`benchmarks/plain.py`), and each form's logits are compared with the dynamic form's on one seeded input (a
change there is the compiled form's, not the model's).

    python benchmarks/ov_shapes.py D/openvino/model.xml D/openvino/model.int8.xml --threads 2
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from plain import median_ms, time_side_by_side  # noqa: E402

FORMS = {
    "dynamic": "dynamic batch, snippets on (the runner before)",
    "static": "static batch 1, snippets on (benchmark_app)",
    "static-nosnip": "static batch 1, snippets off (the runner now)",
}


class FormRunner:
    def __init__(self, xml: str, form: str, threads: int, size: int):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(xml)
        model.reshape({model.inputs[0].get_any_name(): ov.PartialShape([-1 if form == "dynamic" else 1, 3, size, size])})
        config = {ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY,
                  ov.properties.hint.inference_precision: ov.Type.f32, ov.properties.inference_num_threads: threads}
        if form == "static-nosnip":
            config["SNIPPETS_MODE"] = "DISABLE"
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self.name, self.options = f"openvino:{form}", {"threads": threads}

    def run(self, feeds):
        return {"logits": np.array(self._request.infer({0: feeds["input"]})[self._compiled.outputs[0]])}

    def close(self):
        self._request = self._compiled = None


def open_form(xml: str, form: str, threads: int, size: int) -> FormRunner:
    return FormRunner(xml, form, threads, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("irs", nargs="+", type=Path)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=10.0)
    args = ap.parse_args()
    from deploy.report import isa_summary, machine_fingerprint

    size = args.input_size
    factories = {f"{form}|{ir}": functools.partial(open_form, str(ir), form, args.threads, size)
                 for ir in args.irs for form in FORMS}
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    errors, outputs = {}, {}
    for key, make in factories.items():
        runner = make()
        outputs[key] = runner.run({"input": x})["logits"]
        runner.close()
    for key, y in outputs.items():
        ref = outputs[f"dynamic|{key.split('|', 1)[1]}"]
        errors[key] = float(np.abs(y - ref).max() / np.abs(ref).max())
    times = time_side_by_side(factories, size, args.threads, args.duration_s, 0.2)
    env = machine_fingerprint()
    print(f"{env['cpu']} ({isa_summary(env)}), batch 1, {args.threads} threads, {args.duration_s:g} s each\n")
    print("| IR | form | p50 ms | vs static | max change / max logit (vs dynamic) |")
    print("|---|---|---:|---:|---:|")
    for ir in args.irs:
        static = median_ms(times[f"static|{ir}"])
        for form, what in FORMS.items():
            key = f"{form}|{ir}"
            print(f"| {ir.name} | {what} | {median_ms(times[key]):.3f} | {static / median_ms(times[key]):.3f}x "
                  f"| {errors[key]:.1e} |")


if __name__ == "__main__":
    main()
