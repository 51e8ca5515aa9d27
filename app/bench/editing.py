"""The `editing` prompt set: "here is a file, change one thing, return the whole file".

This is where coding agents spend their output tokens (rewrites that mostly repeat their input), and
where prompt-lookup drafting is expected to pay: most answer tokens are copies of prompt tokens.
Each input is 30 to 80 lines of realistic code; the requested change touches a few lines only.
"""

from __future__ import annotations

INVENTORY = """\
from dataclasses import dataclass, field


@dataclass
class Item:
    sku: str
    name: str
    quantity: int
    unit_price: float


@dataclass
class Inventory:
    items: dict[str, Item] = field(default_factory=dict)

    def add(self, item: Item) -> None:
        existing = self.items.get(item.sku)
        if existing is None:
            self.items[item.sku] = item
        else:
            existing.quantity += item.quantity

    def remove(self, sku: str, quantity: int) -> None:
        existing = self.items.get(sku)
        if existing is None:
            raise KeyError(f"unknown sku {sku}")
        if existing.quantity < quantity:
            raise ValueError(f"only {existing.quantity} of {sku} left")
        existing.quantity -= quantity
        if existing.quantity == 0:
            del self.items[sku]

    def total_value(self) -> float:
        return sum(item.quantity * item.unit_price for item in self.items.values())

    def low_stock(self, threshold: int = 5) -> list[Item]:
        return [item for item in self.items.values() if item.quantity <= threshold]

    def report(self) -> str:
        lines = []
        for item in sorted(self.items.values(), key=lambda item: item.sku):
            lines.append(f"{item.sku:10} {item.name:20} {item.quantity:5} {item.unit_price:8.2f}")
        lines.append(f"total value: {self.total_value():.2f}")
        return "\\n".join(lines)
"""

PARSE_LOG = """\
import re
from collections import Counter

LINE = re.compile(
    r"(?P<ip>\\S+) \\S+ \\S+ \\[(?P<time>[^\\]]+)\\] "
    r"\\"(?P<method>\\S+) (?P<path>\\S+) \\S+\\" (?P<status>\\d{3}) (?P<size>\\d+|-)"
)


def parse_line(line):
    match = LINE.match(line)
    if match is None:
        return None
    entry = match.groupdict()
    entry["status"] = int(entry["status"])
    entry["size"] = 0 if entry["size"] == "-" else int(entry["size"])
    return entry


def summarize(lines, top=5):
    statuses = Counter()
    paths = Counter()
    total_bytes = 0
    bad_lines = 0
    for line in lines:
        entry = parse_line(line)
        if entry is None:
            bad_lines += 1
            continue
        statuses[entry["status"]] += 1
        paths[entry["path"]] += 1
        total_bytes += entry["size"]
    return {
        "statuses": dict(statuses),
        "top_paths": paths.most_common(top),
        "total_bytes": total_bytes,
        "bad_lines": bad_lines,
    }


def error_rate(summary):
    total = sum(summary["statuses"].values())
    if total == 0:
        return 0.0
    errors = sum(count for status, count in summary["statuses"].items() if status >= 500)
    return errors / total
"""

CACHE_JS = """\
class LruCache {
  constructor(capacity) {
    if (capacity <= 0) {
      throw new Error("capacity must be postive");
    }
    this.capacity = capacity;
    this.entries = new Map();
    this.hits = 0;
    this.misses = 0;
  }

  get(key) {
    if (!this.entries.has(key)) {
      this.misses += 1;
      return undefined;
    }
    const value = this.entries.get(key);
    this.entries.delete(key);
    this.entries.set(key, value);
    this.hits += 1;
    return value;
  }

  set(key, value) {
    if (this.entries.has(key)) {
      this.entries.delete(key);
    } else if (this.entries.size >= this.capacity) {
      const oldest = this.entries.keys().next().value;
      this.entries.delete(oldest);
    }
    this.entries.set(key, value);
  }

  hitRate() {
    const total = this.hits + this.misses;
    return total === 0 ? 0 : this.hits / total;
  }

  clear() {
    this.entries.clear();
    this.hits = 0;
    this.misses = 0;
  }
}

module.exports = { LruCache };
"""

CONFIG = """\
import os
from pathlib import Path

DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8080,
    "workers": 2,
    "log_level": "info",
    "data_dir": "~/.local/share/app",
}


class ConfigError(Exception):
    pass


def load_config(environ=None):
    environ = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    for key in DEFAULTS:
        name = "APP_" + key.upper()
        if name in environ:
            config[key] = environ[name]
    try:
        config["port"] = int(config["port"])
        config["workers"] = int(config["workers"])
    except ValueError as error:
        raise ConfigError(f"invalid number: {error}") from error
    if not 0 < config["port"] < 65536:
        raise ConfigError(f"port out of range: {config['port']}")
    if config["workers"] < 1:
        raise ConfigError("workers must be at least 1")
    if config["log_level"] not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"unknown log level: {config['log_level']}")
    config["data_dir"] = Path(config["data_dir"]).expanduser()
    return config


def describe(config):
    return ", ".join(f"{key}={value}" for key, value in sorted(config.items()))
"""

# (id, request). The file goes in a fenced block after the instruction, as an agent would send it.
EDITING: list[tuple[str, str]] = [
    (
        "rename",
        "Rename the method `low_stock` to `items_below` everywhere in this file. "
        "Return the whole file and nothing else.\n\n```python\n" + INVENTORY + "```",
    ),
    (
        "type-hints",
        "Add type hints to every function in this file (keep the behaviour the same). "
        "Return the whole file and nothing else.\n\n```python\n" + PARSE_LOG + "```",
    ),
    (
        "typo",
        "Fix the spelling mistake in the constructor's error message. "
        "Return the whole file and nothing else.\n\n```javascript\n" + CACHE_JS + "```",
    ),
    (
        "default",
        "Change the default port to 9090 and the default number of workers to 4. "
        "Return the whole file and nothing else.\n\n```python\n" + CONFIG + "```",
    ),
]
