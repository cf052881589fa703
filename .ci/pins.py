"""The pinned requirements of pyproject.toml: `pins.py` prints their short hash (the key of the
reusable virtual environment), `pins.py --requirements` prints them one per line for pip."""
import hashlib
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
pins = project["dependencies"] + project["optional-dependencies"]["test"]
if sys.argv[1:] == ["--requirements"]:
    print("\n".join(pins))
else:
    key = sorted(project["dependencies"]) + sorted(project["optional-dependencies"]["test"])
    text = "\n".join(key) + f"\npython{sys.version_info.major}.{sys.version_info.minor}\n"
    print(hashlib.sha256(text.encode()).hexdigest()[:12])
