"""`lmpipeline package PATH --output-dir DIR` and `lmpipeline package --verify ARCHIVE`.

Packaging writes <DIR>/<name>.tar.gz (+ .sha256) and leaves README.md, metadata.json and
requirements.txt in <DIR>/<name>/. --verify re-hashes every file of an archive against its
metadata.json and checks that every member is safe to extract; exit 0 when it passes, 1 otherwise.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from lmpipeline.errors import UserError


def package_command(path: str | None = None, output_dir: str | None = None, *, verify: str | None = None,
                    source: str = "auto", name: str | None = None, license: str | None = None,
                    tags: list[str] | None = None, push_to_hub: bool = False, hub_repo_id: str | None = None,
                    public: bool = False, gguf: bool = False, gguf_outtype: str = "f16",
                    llama_cpp_convert: str | None = None, base_model: str | None = None,
                    compress_level: int = 6) -> int:
    from lmpipeline.config.lifecycle import PackageConfig
    from lmpipeline.export.package import build_package, verify_archive

    if verify:
        if path or output_dir:
            raise UserError("--verify ARCHIVE takes no PATH or --output-dir")
        report = verify_archive(verify)
        print(f"{verify}: {report.summary()}")
        return 0 if report.ok else 1
    if not path or not output_dir:
        raise UserError("package needs PATH and --output-dir DIR (or --verify ARCHIVE)")
    try:
        cfg = PackageConfig(source=source, model_name=name, license=license, tags=list(tags or []),
                            push_to_hub=push_to_hub, hub_repo_id=hub_repo_id, hub_private=not public, gguf=gguf,
                            gguf_outtype=gguf_outtype, llama_cpp_convert=llama_cpp_convert,
                            compress_level=compress_level)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "options"
        raise UserError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    result = build_package(path, output_dir, cfg, base_model=base_model)
    print(f"package: {result.archive}\nsha256:  {result.sha256}\ncard:    {result.folder / 'README.md'}")
    if result.gguf:
        print(f"gguf:    {result.gguf.get('file') or result.gguf.get('reason')}")
    if result.hub_url:
        print(f"hub:     {result.hub_url}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("package", help="package a model as a verified archive, or verify one",
                              description="Package the model of PATH (adapter or merged) with metadata, model "
                                          "card and requirements; or check an archive with --verify.")
    p.add_argument("path", nargs="?", help="run folder, stage folder, adapter folder or model folder")
    p.add_argument("--output-dir", metavar="DIR", help="where the archive goes")
    p.add_argument("--verify", metavar="ARCHIVE", help="re-check every file hash of an existing package")
    p.add_argument("--source", choices=("auto", "adapter", "merged"), default="auto",
                   help="what to package from a run (auto: merged if a merge stage ran, else the adapter)")
    p.add_argument("--name", help="package name (default: <run>-<stage>)")
    p.add_argument("--license", help="license id for the model card, e.g. apache-2.0")
    p.add_argument("--tag", dest="tags", action="append", default=[], help="extra model-card tag (repeatable)")
    p.add_argument("--push-to-hub", action="store_true", help="upload to the Hub (token from HF_TOKEN only)")
    p.add_argument("--hub-repo-id", metavar="OWNER/NAME", help="Hub repository to upload to")
    p.add_argument("--public", action="store_true", help="create the Hub repository as public (default private)")
    p.add_argument("--gguf", action="store_true", help="also export GGUF with llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--gguf-outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0", "auto"))
    p.add_argument("--llama-cpp-convert", metavar="FILE", help="path to convert_hf_to_gguf.py")
    p.add_argument("--base-model", metavar="PATH_OR_ID", help="base model, if not the recorded one")
    p.add_argument("--compress-level", type=int, default=6, choices=range(0, 10), metavar="0-9",
                   help="gzip level (default 6; weights compress little, 1 is much faster)")
    p.set_defaults(func=lambda a: package_command(
        a.path, a.output_dir, verify=a.verify, source=a.source, name=a.name, license=a.license, tags=a.tags,
        push_to_hub=a.push_to_hub, hub_repo_id=a.hub_repo_id, public=a.public, gguf=a.gguf,
        gguf_outtype=a.gguf_outtype, llama_cpp_convert=a.llama_cpp_convert, base_model=a.base_model,
        compress_level=a.compress_level))
    return p
