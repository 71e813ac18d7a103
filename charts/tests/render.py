"""Renders a chart to YAML on stdout with Helm's SDK (no helm binary):
    python render.py CHART --release NAME --namespace NS [--values JSON]
Used by the real-cluster e2e to apply exactly what `helm install` would."""

import argparse
import json
import sys

import helm_python as helm
import yaml


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("chart")
    parser.add_argument("--release", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--values", default="{}", help="values as JSON")
    args = parser.parse_args()
    chart = helm.Chart.load(args.chart)
    values = json.loads(args.values)
    chart.validate_schema(values)
    manifests = chart.render(values, name=args.release, namespace=args.namespace, is_install=True)
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                sys.stdout.write("---\n" + yaml.safe_dump(doc, sort_keys=False))


if __name__ == "__main__":
    main()
