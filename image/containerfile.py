"""Prints the Dockerfile's runtime stage (everything from its last FROM on)
as a Containerfile that builds from a local rootfs: the build stage's
`COPY --from=build /rootfs/ /` becomes `COPY rootfs/ /`. `make image` builds
that, so the Docker build and the buildah build cannot drift apart.
    python3 image/containerfile.py Dockerfile"""

import re
import sys

BUILD_COPY = re.compile(r"^COPY --from=build /rootfs/ /$")


def runtime_stage(dockerfile: str) -> str:
    lines = dockerfile.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    if not starts:
        raise SystemExit("no FROM in the Dockerfile")
    stage = lines[starts[-1]:]
    if stage[0].split()[1] != "scratch":
        raise SystemExit("the runtime stage must be FROM scratch")
    copies = [i for i, line in enumerate(stage) if BUILD_COPY.match(line)]
    if len(copies) != 1:
        raise SystemExit("the runtime stage must copy the build's rootfs exactly once: COPY --from=build /rootfs/ /")
    stage[copies[0]] = "COPY rootfs/ /"
    return "\n".join(stage) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(runtime_stage(f.read()))
