"""Print a short hash of the pinned requirements: the key of the reusable virtual environment."""
import hashlib
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
pins = sorted(project["dependencies"]) + sorted(project["optional-dependencies"]["test"])
text = "\n".join(pins) + f"\npython{sys.version_info.major}.{sys.version_info.minor}\n"
print(hashlib.sha256(text.encode()).hexdigest()[:12])
