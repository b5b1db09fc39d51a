"""--help for the scripts, read from the source: the config dataclasses (ast; each field's comment is its line) and
the option files in conf/. A leaf: it imports nothing of the package, nor torch nor Hydra, so help is instant."""

from __future__ import annotations

import ast
import io
import re
import shutil
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train": "scripts/train.py", "eval": "scripts/eval_extrapolate.py"}
UNDOCUMENTED = "(undocumented)"
GROUP_KEYS = ("defaults", "hydra")  # keys of an option file that are Hydra's, not settings


def answer_help(script: str, argv: list[str]) -> None:
    """Print the help of `script` ("train" or "eval") and exit 0 when -h or --help is among argv; else return."""
    if "-h" in argv or "--help" in argv:
        print(help_text(script), end="")
        sys.exit(0)


# ----------------------------------------------------------------------------------------------
# The source, read without importing it


@dataclass
class Field:
    """One dataclass field as written: its annotation, its default and its comment, all as source text."""

    name: str
    annotation: ast.expr
    default: Optional[ast.expr]
    comment: str


@dataclass
class ConfigClass:
    """A class of the package as written: its module, docstring and fields (its bases' merged in, in order)."""

    name: str
    module: str
    doc: str
    fields: dict[str, Field]


@dataclass
class Registry:
    """A Registry(...) of the package: the setting that names a member, the field holding it, the members."""

    setting: str
    field: Optional[str]
    members: dict[str, ConfigClass] = field(default_factory=dict)


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def module_path(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@lru_cache(maxsize=None)
def parse(module: str) -> tuple[ast.Module, dict[int, tuple[str, bool]]]:
    """A module's tree and its comments by line: (text, whether the comment is the whole line)."""
    text = module_path(module).read_text()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            whole = not token.line[:token.start[1]].strip()
            comments[token.start[0]] = (token.string.lstrip("#").strip(), whole)
    return ast.parse(text), comments


def imported(module: str, name: str) -> Optional[str]:
    """The module `name` is imported from in `module` (imports inside functions count), or None."""
    for node in ast.walk(parse(module)[0]):
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
            return node.module
    return None


def assignment(module: str, name: str) -> Optional[ast.expr]:
    """The value module-level `name = ...` is given, or None."""
    for node in parse(module)[0].body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            return node.value
    return None


def comment_of(comments: dict[int, tuple[str, bool]], node: ast.AST) -> str:
    """The comment lines directly above `node`, then its trailing comment, as one line."""
    above, line = [], node.lineno - 1
    while line in comments and comments[line][1]:
        above.insert(0, comments[line][0])
        line -= 1
    trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments and not comments[n][1]]
    return " ".join(above + trailing)


@lru_cache(maxsize=None)
def config_class(module: str, name: str) -> Optional[ConfigClass]:
    """The class `name` as `module` sees it (followed through imports), its bases' fields first; None if none."""
    tree, comments = parse(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        source = imported(module, name)
        return config_class(source, name) if source and source.startswith("minillm.") else None  # the package's
    fields: dict[str, Field] = {}
    for base in node.bases:
        parent = config_class(module, base.id) if isinstance(base, ast.Name) else None
        fields.update(parent.fields if parent else {})
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                and not ast.unparse(item.annotation).startswith("ClassVar"):
            inherited = fields.get(item.target.id)
            comment = comment_of(comments, item) or (inherited.comment if inherited else "")
            fields[item.target.id] = Field(item.target.id, item.annotation, item.value, comment)
    return ConfigClass(name, module, ast.get_docstring(node) or "", fields)


def strings(module: str, node: ast.expr) -> list[str]:
    """The strings a decorator argument names: literals, tuples of them, a dict's keys, followed through names."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [s for item in node.elts for s in strings(module, item)]
    if isinstance(node, ast.Dict):
        return [s for key in node.keys if key is not None for s in strings(module, key)]
    if isinstance(node, ast.Starred):  # *NAMES
        return strings(module, node.value)
    if isinstance(node, ast.Call) and node.args:  # tuple(NAMES)
        return strings(module, node.args[0])
    if isinstance(node, ast.Name):
        value = assignment(module, node.id)
        return strings(module, value) if value is not None else []
    return []


def registry_of(module: str, name: str) -> Optional[tuple[str, str]]:
    """(module, name) of the Registry that `name` in `module` is, or whose .register it is."""
    value = assignment(module, name)
    if value is None:
        source = imported(module, name)
        return registry_of(source, name) if source and source.startswith("minillm.") else None
    if isinstance(value, ast.Attribute) and value.attr == "register" and isinstance(value.value, ast.Name):
        return registry_of(module, value.value.id)
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "Registry":
        return module, name
    return None


def registrations(module: str):
    """(registry, names, class name) for each class `module` registers, by decorator or by a call."""
    for node in parse(module)[0].body:
        if isinstance(node, ast.ClassDef):
            calls = [(d, node.name) for d in node.decorator_list if isinstance(d, ast.Call)]
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Call) \
                and node.value.args and isinstance(node.value.args[0], ast.Name):
            calls = [(node.value.func, node.value.args[0].id)]  # register("none")(Scaling)
        else:
            continue
        for call, cls in calls:
            func = call.func
            name = func.id if isinstance(func, ast.Name) else \
                func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            registry = registry_of(module, name) if name else None
            if registry is not None:
                yield registry, [s for arg in call.args for s in strings(module, arg)], cls


@lru_cache(maxsize=None)
def registry(module: str, name: str) -> Registry:
    """The Registry `name` of `module` with its members, found in the modules of its folder."""
    call = assignment(module, name)
    keywords = {k.arg: k.value.value for k in call.keywords if isinstance(k.value, ast.Constant)}
    found = Registry(call.args[0].value, keywords.get("field"))
    folder = module_path(module).parent
    for other in map(module_of, sorted(folder.glob("*.py"))):
        for where, names, cls in registrations(other):
            if where == (module, name):
                found.members.update({n: config_class(other, cls) for n in names})
    return found


def registries_by_group() -> dict[str, Registry]:
    """The registries whose setting is a group's field (rope.variant -> rope), from the positions room."""
    found = {}
    for module in map(module_of, sorted((ROOT / "minillm" / "positions").glob("*.py"))):
        for node in parse(module)[0].body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and isinstance(node.value.func, ast.Name) and node.value.func.id == "Registry":
                reg = registry(module, node.targets[0].id)
                if "." in reg.setting:
                    found[reg.setting.split(".")[0]] = reg
    return found


def settings_registry(module: str, annotation: ast.expr) -> Optional[Registry]:
    """The registry a `make_dataclass` settings class (one field per member, e.g. data.tasks) is made from."""
    name = annotation.value if isinstance(annotation, ast.Constant) else getattr(annotation, "id", None)
    value = assignment(module, name) if isinstance(name, str) else None
    if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "make_dataclass"):
        return None
    for node in ast.walk(value):
        if isinstance(node, ast.comprehension) and isinstance(node.iter, ast.Call) \
                and isinstance(node.iter.func, ast.Attribute) and isinstance(node.iter.func.value, ast.Name):
            where = registry_of(module, node.iter.func.value.id)
            return registry(*where) if where else None
    return None


def nested_class(cls: ConfigClass, item: Field) -> Optional[ConfigClass]:
    """The config class a field holds (`model: ModelSettings = field(default_factory=ModelSettings)`), or None."""
    found = (config_class(cls.module, n.id) for n in ast.walk(item.annotation) if isinstance(n, ast.Name))
    return next((c for c in found if c is not None and c.fields), None)


def shown(value: Any) -> str:
    """A value as a Hydra override writes it: null, true, 0.003, [1,2]; long lists shortened."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        items = [shown(v) for v in value]
        return f"[{','.join(items)}]" if len(items) <= 6 else f"[{','.join(items[:3])},…] ({len(items)} values)"
    return repr(value) if isinstance(value, str) and (not value or re.search(r"[\s,=\[\]{}'\"]", value)) else str(value)


def default_of(item: Field) -> str:
    """A field's default as written in the source: its literal, the list a default_factory lambda returns, []."""
    node = item.default
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        factory = next((k.value for k in node.keywords if k.arg == "default_factory"), None)
        node = factory.body if isinstance(factory, ast.Lambda) else factory
        if isinstance(node, ast.Name) and node.id in ("list", "dict"):
            return "[]" if node.id == "list" else "{}"
    if node is None:
        return "(required)"
    try:
        return shown(ast.literal_eval(node))
    except ValueError:
        return ast.unparse(node)


def type_of(node: ast.expr) -> str:
    """An annotation as a reader says it: Optional[int] -> int|None, Union[int, float] -> int|float, unquoted."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) in ("Optional", "Union"):
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return "|".join([type_of(n) for n in inner] + (["None"] if node.value.id == "Optional" else []))
    return ast.unparse(node)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def read_yaml(text: str) -> dict:
    import yaml  # PyYAML, which Hydra reads conf/ with: a few milliseconds, where Hydra takes a few hundred

    return yaml.safe_load(text) or {}


@lru_cache(maxsize=None)
def option_file(group: str, option: str) -> tuple[str, dict, list, dict]:
    """conf/<group>/<option>.yaml: the first sentence of its leading comment, its settings (Hydra's keys left out),
    its defaults list and the values a sweep (-m) takes."""
    text = (ROOT / "conf" / group / f"{option}.yaml").read_text()
    lead = []
    for line in text.splitlines():
        line = line.lstrip("#").strip() if line.startswith("#") else None
        if line is None or line.startswith("python "):  # the comment ends, or its example command begins
            break
        if not line.startswith("@package"):
            lead.append(line)
    sentence = re.split(r"(?<=[^.][.!?])\s+(?=[A-Z`])", " ".join(lead), maxsplit=1)[0]  # not at "0 .. T"
    if len(sentence) > 160:  # a long first sentence: its head, up to the colon or semicolon that ends it
        sentence = re.split(r"[:;] ", sentence, maxsplit=1)[0] + " …"
    values = read_yaml(text)
    sweeps = values.get("hydra", {}).get("sweeper", {}).get("params", {})
    return sentence, {k: v for k, v in values.items() if k not in GROUP_KEYS}, values.get("defaults", []), sweeps


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


# ----------------------------------------------------------------------------------------------
# The text


def first_line(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


class Page:
    """The help's lines, wrapped to the terminal (80 to 120 columns): `key=default  [type] description` rows, each
    nested config (a group, a registry's settings, a class) in its own section."""

    def __init__(self, width: int, groups: dict[str, Optional[str]]):
        self.width, self.groups, self.lines = width, groups, []
        self.by_group = registries_by_group()

    def text(self, line: str = "", indent: int = 0) -> None:
        self.lines += textwrap.wrap(line, self.width, initial_indent=" " * indent, subsequent_indent=" " * (indent + 4),
                                    break_on_hyphens=False, break_long_words=False) or [""]

    def row(self, left: str, description: str, indent: int, key_width: int = 40) -> None:
        """One setting or option: its left column, then its description wrapped beside it."""
        head = " " * indent + left
        column = max(key_width, len(head) + 2)
        body = textwrap.wrap(description, max(self.width - column, 30), break_on_hyphens=False,
                             break_long_words=False) or [""]
        self.lines += [head.ljust(column) + body[0]] + [" " * column + more for more in body[1:]]

    def fields(self, cls: ConfigClass, prefix: str, indent: int, overrides: Optional[dict] = None,
               hide: frozenset = frozenset()) -> None:
        """cls's settings as `prefix.name=default` rows (the chosen option's `overrides`), then a section for each
        nested config."""
        nested, overrides = [], overrides or {}
        for item in (item for item in cls.fields.values() if item.name not in hide):
            key = f"{prefix}{item.name}"
            inner, members = nested_class(cls, item), settings_registry(cls.module, item.annotation)
            if key in self.groups or inner is not None or members is not None:
                nested.append((key, item, inner, members))
                continue
            default = shown(overrides[item.name]) if item.name in overrides else default_of(item)
            self.row(f"{key}={default}", f"[{type_of(item.annotation)}] {item.comment or UNDOCUMENTED}", indent)
        for key, item, inner, members in nested:
            self.section(key, item, inner, members)

    def section(self, key: str, item: Field, inner: Optional[ConfigClass], members: Optional[Registry]) -> None:
        """One nested config: a group (its options and the classes they choose), a registry's settings, or a class."""
        chosen = self.groups.get(key)
        self.text()
        self.text(f"{key}: {item.comment or (first_line(inner.doc) if inner else UNDOCUMENTED)}", 0)
        if key in self.groups:  # its options are the rows below
            self.text(f"{key}=<option> chooses one (* the default); {key}.<setting>=<value> sets one", 2)
        if key in self.by_group:  # each option chooses a registered class (rope, rope_scaling, positions)
            self.registered_options(key, self.by_group[key], chosen)
        elif members is not None:  # one settings class per registered member: data.tasks.<task>.<knob>
            for name, cls in members.members.items():
                self.text(f"{key}.{name}: {first_line(cls.doc)}", 2)
                self.fields(cls, f"{key}.{name}.", 4)
        else:
            for option in options(key) if key in self.groups else []:
                self.option(key, option, chosen, "")
            self.fields(inner, f"{key}.", 2, option_file(key, chosen)[1] if chosen else {})

    def registered_options(self, group: str, reg: Registry, chosen: Optional[str]) -> None:
        """The options of a group by the class each chooses; settings every option has are shown once (with the
        default option's defaults), each class's own below its options (and those whose default or meaning it
        changes)."""
        classes: dict[str, list[str]] = {}
        for option in options(group):
            schema = next((d for d in option_file(group, option)[2] if isinstance(d, str) and "/schema/" in d), "")
            classes.setdefault(reg.members[schema.split("/")[-1].split("@")[0]].name, []).append(option)
        members = {name: next(c for c in reg.members.values() if c.name == name) for name in classes}
        base = members[next(name for name, chosen_by in classes.items() if chosen in chosen_by)]
        common = {name: (default_of(item), item.comment) for name, item in base.fields.items() if name != reg.field
                  and all(name in c.fields for c in members.values())}
        if common:
            self.text(f"every option has {', '.join(f'{group}.{name}' for name in common)}:", 2)
            self.fields(base, f"{group}.", 6, hide=set(base.fields) - set(common))
        for cls_name, chosen_by in classes.items():
            cls = members[cls_name]
            for option in chosen_by:
                self.option(group, option, chosen, first_line(cls.doc))
            hide = {name for name, item in cls.fields.items() if common.get(name) == (default_of(item), item.comment)}
            if reg.field and sum(c.name == cls_name for c in reg.members.values()) == 1:  # the option names it
                hide.add(reg.field)
            if not set(cls.fields) - hide:
                self.text("(no settings of its own)", 6)
            self.fields(cls, f"{group}.", 6, hide=hide)

    def option(self, group: str, option: str, chosen: Optional[str], fallback: str) -> None:
        """`group=option  its file's first sentence. Sets key=value ... Sweeps ...`."""
        sentence, values, defaults, sweeps = option_file(group, option)
        choices = [f"{k.split('/')[-1]}={v}" for d in defaults if isinstance(d, dict) for k, v in d.items()]
        sets = [f"{k}={shown(v)}" for k, v in flatten(values).items()]
        sweeps = [f"{k}={v}" for k, v in sweeps.items()]
        text = (sentence or fallback) + (" Sets " + " ".join(choices + sets) + "." if choices or sets else "")
        text += " Sweeps " + " ".join(sweeps) + " (with -m)." if sweeps else ""
        self.row(f"{group}={option}" + (" *" if option == chosen else ""), text or UNDOCUMENTED, 2)


def script_facts(script: str) -> tuple[str, str, str]:
    """(path, first docstring line, Hydra config name) of a script, from its source."""
    path = SCRIPTS[script]
    tree = ast.parse((ROOT / path).read_text())
    config_name = next(k.value.value for n in ast.walk(tree) if isinstance(n, ast.Call)
                       for k in n.keywords if k.arg == "config_name")
    return path, first_line(ast.get_docstring(tree) or ""), config_name


def schema_class(schema: str) -> ConfigClass:
    """The dataclass minillm/cli.py stores in Hydra's ConfigStore as `schema` (store.store(name=..., node=Class))."""
    module = "minillm.cli"
    for node in ast.walk(parse(module)[0]):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "store":
            keywords = {k.arg: k.value for k in node.keywords}
            name, target = keywords.get("name"), keywords.get("node")
            if isinstance(name, ast.Constant) and name.value == schema and isinstance(target, ast.Name):
                return config_class(module, target.id)
    raise LookupError(f"minillm/cli.py stores no schema named {schema!r}")


def help_text(script: str, width: Optional[int] = None) -> str:
    """The whole help of `script`: usage, then every setting of its config tree, one row each."""
    path, purpose, config_name = script_facts(script)
    entry = read_yaml((ROOT / "conf" / f"{config_name}.yaml").read_text())
    schema = next(d for d in entry["defaults"] if isinstance(d, str) and d != "_self_")
    groups = {k: v for d in entry["defaults"] if isinstance(d, dict) for k, v in d.items()}
    root = schema_class(schema)
    page = Page(width or min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120), groups)
    page.text(f"{path}: {purpose}")
    page.text()
    page.text(f"usage: python {path} [group=option ...] [key=value ...]")
    page.text("-m runs a sweep of comma-separated values (seed=0,1,2); --cfg job prints the composed settings "
              "without running; hydra.run.dir=<folder> sets the output folder; --hydra-help shows Hydra's options.", 2)
    page.text()
    page.text("Groups (conf/<group>/<option>.yaml; * the default):")
    for group, chosen in groups.items():
        page.row(f"  {group}", ", ".join(o + ("*" if o == chosen else "") for o in options(group)), 0, 16)
    page.text()
    page.text("Settings (key=default [type] description); nested ones below, by group:")
    page.fields(root, "", 2, flatten({k: v for k, v in entry.items() if k not in GROUP_KEYS}))
    for group in (g for g in groups if g not in root.fields):  # overlays that are no field: experiment
        page.text()
        page.text(f"{group}: an overlay of settings over the whole run (choose with {group}=<option>)")
        for option in options(group):
            page.option(group, option, groups[group], "")
    return "\n".join(page.lines) + "\n"
