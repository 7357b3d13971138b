"""What the loader makes of a data file: `python -m opsd_jax.data.inspect PATH
[--fields problem=KEY,solution=KEY,answer=KEY] [--format LAYOUT] [--skip] [--require-reference]`.

Prints the file type and detected layout, the counts (skipped rows per reason, the first few
"file:line: why") and three normalised rows, so a researcher sees before a run what it will
train on.
"""
from __future__ import annotations

import argparse
import json
import sys

from opsd_jax.data import formats, loader

SHOWN_ROWS = 3


def parse_fields(text: str) -> dict[str, str] | None:
  """"problem=q,answer=reward_model.ground_truth" -> {"problem": "q", "answer": ...}."""
  if not text:
    return None
  fields = {}
  for part in text.split(","):
    role, sep, key = part.partition("=")
    if not sep or not role.strip() or not key.strip():
      raise formats.DataError(f"--fields: {part!r} is not ROLE=KEY (roles: {formats.FIELD_ROLES})")
    fields[role.strip()] = key.strip()
  return fields


def describe(path: str, fields=None, fmt: str = "auto", on_bad_row: str = "error",
             require_reference: bool = False) -> str:
  """The text `main` prints for one file."""
  records, report = loader.load(path, fields, fmt, on_bad_row, require_reference)
  lines = [f"file: {report.path} ({report.file_type})", f"layout: {report.layout}",
           f"rows: {report.rows} read, {report.kept} kept, {report.skipped} skipped"]
  lines += [f"  skipped, {reason}: {n}" for reason, n in report.reasons.items()]
  lines += [f"  e.g. {example}" for example in report.examples]
  with_reference = sum(r["reference"] is not None for r in records)
  lines.append(f"with a reference solution: {with_reference} of {len(records)}")
  for i, record in enumerate(records[:SHOWN_ROWS]):
    lines.append(f"record {i}: {json.dumps(record, ensure_ascii=False)}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m opsd_jax.data.inspect",
                                   description=__doc__.split("\n\n")[1])
  parser.add_argument("path")
  parser.add_argument("--fields", default="", help="problem=KEY,solution=KEY,answer=KEY")
  parser.add_argument("--format", default="auto", choices=formats.FORMATS)
  parser.add_argument("--skip", action="store_true", help="skip and count bad rows")
  parser.add_argument("--require-reference", action="store_true")
  args = parser.parse_args(argv)
  try:
    print(describe(args.path, parse_fields(args.fields), args.format,
                   "skip" if args.skip else "error", args.require_reference))
  except formats.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
