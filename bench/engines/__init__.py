"""bench/engines: the engines the platform builds (ONNX Runtime, fp32 and int8) against the model's own
framework (scikit-learn predict_proba, PyTorch eager), side by side in one run, on CPU.

Run `python -m bench.engines [--quick]` (no database, no servers: engines are built in-process by
pipelines/build_sandbox.py from MLflow models saved to a temporary folder).
"""
