"""Checks the Dockerfile's structure offline (no container engine here):
it parses, builds in one stage and runs in another, runs as a non-root
user, keeps REALM_HOME on a volume, and has a HEALTHCHECK on /readyz.

    python deploy/check_dockerfile.py Dockerfile
"""

import sys

from dockerfile_parse import DockerfileParser


def main(path: str) -> int:
    parsed = DockerfileParser(path=path)
    final = []
    for instruction in parsed.structure:
        if instruction["instruction"] == "FROM":
            final = []
        final.append((instruction["instruction"], instruction["value"]))
    problems = []
    if not parsed.is_multistage:
        problems.append("not a multi-stage build")
    users = [value for name, value in final if name == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append("the final stage does not run as a non-root USER")
    if not any(name == "VOLUME" and "/data" in value for name, value in final):
        problems.append("no VOLUME for /data (REALM_HOME: models, tenants' data)")
    if ("ENV", "REALM_HOME=/data") not in final:
        problems.append("REALM_HOME is not /data")
    if not any(name == "HEALTHCHECK" and "/readyz" in value for name, value in final):
        problems.append("no HEALTHCHECK on /readyz")
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
