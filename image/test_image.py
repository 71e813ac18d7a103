"""The container image recipe: the Dockerfile's runtime stage is the image
`make image` builds (image/containerfile.py derives one from the other), so
the two cannot drift; these tests hold the recipe to what the charts and the
bundle expect, and check an archive built by `make image` when there is
one."""

import gzip
import io
import json
import pathlib
import re
import sys
import tarfile

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import containerfile  # noqa: E402

DOCKERFILE = (ROOT / "Dockerfile").read_text()
ARCHIVE = ROOT / "target" / "image" / "tether.tar"


def makefile_programs():
    match = re.search(r"^PROGRAMS = (.+)$", (ROOT / "Makefile").read_text(), re.M)
    return match.group(1).split()


def instruction(stage, name):
    lines = [line for line in stage.splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, f"one {name} in the runtime stage"
    return lines[0][len(name) + 1:]


def test_syntax_line_is_the_first_line():
    # Builders read `# syntax=` only as the file's very first line.
    assert DOCKERFILE.splitlines()[0].startswith("# syntax=docker/dockerfile:")


def test_runtime_stage_is_minimal_and_non_root():
    stage = containerfile.runtime_stage(DOCKERFILE)
    assert stage.splitlines()[0] == "FROM scratch", "no shell, no package manager"
    # Numeric, so the kubelet's runAsNonRoot can verify it.
    assert instruction(stage, "USER") == "65532:65532"
    entrypoint = json.loads(instruction(stage, "ENTRYPOINT"))
    assert entrypoint == ["/usr/local/bin/tether-server"]
    assert instruction(stage, "COPY") == "rootfs/ /"


def test_the_build_stage_and_make_image_use_one_recipe():
    assert "RUN make static-rootfs ROOTFS=/rootfs" in DOCKERFILE
    assert makefile_programs() == ["tether-server", "tether-agent", "tether-operator", "kubectl-tether"]


@pytest.mark.parametrize("broken", [
    "FROM rust AS build\nFROM debian\nCOPY --from=build /rootfs/ /\n",
    "FROM rust AS build\nFROM scratch\nCOPY --from=build /out/ /usr/local/bin/\n",
])
def test_a_drifted_dockerfile_is_refused(broken):
    with pytest.raises(SystemExit):
        containerfile.runtime_stage(broken)


def test_the_built_archive_matches_the_recipe():
    if not ARCHIVE.exists():
        pytest.skip(f"{ARCHIVE} not built (make image)")
    stage = containerfile.runtime_stage(DOCKERFILE)
    with tarfile.open(ARCHIVE) as oci:
        blob = lambda digest: oci.extractfile("./blobs/sha256/" + digest.split(":")[1]).read()
        index = json.loads(oci.extractfile("./index.json").read())
        (entry,) = index["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"].startswith("ghcr.io/tether-dev/tether:")
        manifest = json.loads(blob(entry["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        assert config["config"]["User"] == instruction(stage, "USER")
        assert config["config"]["Entrypoint"] == json.loads(instruction(stage, "ENTRYPOINT"))
        assert config["created"] == "1970-01-01T00:00:00Z", "reproducible"
        files = set()
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            if layer["mediaType"].endswith("gzip"):
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as contents:
                files |= {m.name for m in contents.getmembers() if m.isfile()}
    assert files == {f"usr/local/bin/{p}" for p in makefile_programs()}, "the four programs and nothing else"
