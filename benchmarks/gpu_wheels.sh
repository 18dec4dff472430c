#!/usr/bin/env bash
# Fill .whl/ with what benchmarks/gpu_check.sh needs on the lent GPU machine and its image lacks
# (its Python is 3.12; it has torch, torchvision, timm, numpy, pandas, pyarrow, OpenCV, aiohttp, grpcio,
# ... but no Ray, Optuna, smp or albumentations). Run here, with network access to PyPI, from the
# repository root; .whl/ must be ignored (`echo /.whl/ >> .git/info/exclude`) and is carried by the
# device tool (`carry: [".whl"]`). The versions are this .venv's, so both machines run the same ones.
#
# Ray's wheel (79 MB) is over the tool's 64 MiB: it is unpacked, its Java jars, RLlib and LLM
# folders (none imported by Tune or Train) are removed, and it is packed again as ray.tar.xz
# (about 31 MB), which gpu_check.sh extracts into its --target folder. Left out on purpose:
# py-spy (a binary the dashboard calls for profiling), torchio/SimpleITK, nibabel, pydicom,
# highdicom (no GPU step uses them).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=.whl
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
PACKAGES=(ray optuna alembic sqlalchemy mako colorlog segmentation_models_pytorch albumentations albucore
          stringzilla simsimd pydantic pydantic_core annotated_types typing_inspection tensorboardX jsonschema
          jsonschema_specifications referencing rpds_py aiohttp_cors colorful opencensus opencensus_context
          google_api_core googleapis_common_protos proto_plus google_auth pyasn1_modules pyasn1 cryptography
          cffi pycparser smart_open virtualenv distlib platformdirs python_discovery opentelemetry_sdk
          opentelemetry_api opentelemetry_exporter_prometheus opentelemetry_proto
          opentelemetry_semantic_conventions)
pins=()
for p in "${PACKAGES[@]}"; do pins+=("$p==$(version "$p")"); done
mkdir -p "$OUT"
platforms=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
           manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$OUT" "${pins[@]}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unzip -q "$OUT"/ray-*.whl -d "$work"
rm -rf "$work/ray/jars" "$work/ray/rllib" "$work/ray/llm"
tar -C "$work" -cf - . | xz -T0 -6 > "$OUT/ray.tar.xz"
rm "$OUT"/ray-*.whl
du -sh "$OUT"
