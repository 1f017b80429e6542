"""The docs as a newcomer meets them: a short README that leads with the integration diff and links every page
of the reference in docs/, whose pages are all in the site's navigation. `make docs` (in CI) builds the site
strictly, so a broken link or anchor fails there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

# The sections the long README had: each is a heading of some docs page (nothing was lost in the move).
SECTIONS = [
    'Set up a checkout',
    'Install',
    'Quickstart',
    'Precision: what `auto` picks, and why',
    'amptpl doctor',
    'The generated project',
    'Copying the AMP core into your repo',
    'The contract with your loop',
    'Loop shapes',
    'Troubleshooting the copied core',
    'Updating a project',
    'Checkpoints that never lose a run',
    'Graceful stop',
    'One run per out_dir',
    'The loss scale, seen and guarded',
    'Collapse guard',
    'fp32 regions',
    'Using the trained model',
    'Scaling out',
    'What changes with N processes',
    'Checkpoints and resuming',
    'Several machines',
    'FSDP',
    'DeepSpeed',
    'What was tested, and what was not',
    'Performance',
]


def headings() -> set[str]:
    found = set()
    for page in DOCS.glob("*.md"):
        fence = False
        for line in page.read_text(encoding="utf-8").splitlines():
            fence ^= line.startswith("```")
            if not fence and line.startswith("#"):
                found.add(line.lstrip("#").strip())
    return found


def test_the_readme_is_short_and_leads_with_the_integration_diff():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 12_000, f"README.md has grown to {len(text)} characters"
    first_diff = text.splitlines().index("```diff")
    assert first_diff < 25, f"the integration diff starts at line {first_diff + 1}"


def test_the_readme_links_every_docs_page_and_each_link_exists():
    text = README.read_text(encoding="utf-8")
    links = set(re.findall(r"\]\((docs/[^)#]+)", text))
    assert {f"docs/{p.name}" for p in DOCS.glob("*.md")} <= links
    for link in links:
        assert (REPO / link).is_file(), link


def page_table(text: str) -> list[str]:
    rows = text[text.index("| page | what it covers |"):].split("\n\n")[0]
    return [row.replace("](docs/", "](") for row in rows.strip().splitlines()]


def test_the_sites_home_lists_the_pages_as_the_readme_does():
    readme, home = README.read_text(encoding="utf-8"), (DOCS / "index.md").read_text(encoding="utf-8")
    assert page_table(home) == page_table(readme)


def test_every_docs_page_is_in_the_sites_navigation_and_no_more():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = {next(iter(item.values())) for item in config["nav"]}
    assert nav == {p.name for p in DOCS.glob("*.md")}


def test_the_api_page_documents_every_module_of_the_amp_core():
    core = REPO / "template" / "src" / "project" / "amp"
    modules = {".".join(("project", "amp", *p.relative_to(core).with_suffix("").parts)).removesuffix(".__init__")
               for p in core.rglob("*.py")}  # the kernel and amp/debug/
    documented = set(re.findall(r"^::: (\S+)$", (DOCS / "api.md").read_text(encoding="utf-8"), flags=re.M))
    assert documented == modules


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_of_the_reference_has_its_page(section):
    assert section in headings()


def test_the_panel_picture_has_the_rows_the_panel_shows_now_and_its_caption_names_the_command():
    """docs/panel.svg is a picture of the live panel at the end of an fp16 run on a CPU: a row added to, renamed in
    or dropped from ``console.render`` makes it stale, and `make panel` draws it again."""
    import html

    sys.path.insert(0, str(REPO / "template" / "src"))
    from project.amp.console import Status, render

    svg = (DOCS / "panel.svg").read_text(encoding="utf-8")
    drawn = [html.unescape(t).replace("\xa0", " ").strip()
             for t in re.findall(r'<text [^>]*x="24.4"[^>]*>([^<]*)</text>', svg)]  # the first column's cells
    # what an fp16 run on a CPU shows at its last tick: a loss scale, the fp16 meters, an eta; no GPU memory
    last = Status(step=150, total_steps=150, precision="fp16", loss=2.0, lr=1e-4, scale=2.0**19, scale_trend=[1.0],
                  grad_norm=1.0, samples_per_s=1.0, eta_s=0.0, meters={"amp/scale_headroom_bits": 3.0})
    shown = [str(cell) for cell in render(last).columns[0].cells]
    assert drawn == shown, "docs/panel.svg is stale: `make panel` draws it again"
    for page, caption in ((README, "](docs/panel.svg)"), (DOCS / "index.md", "](panel.svg)")):
        line = next(x for x in page.read_text(encoding="utf-8").splitlines() if caption in x)
        assert "make panel" in line, f"{page.name}: the picture's caption does not say which command drew it"


@pytest.mark.slow
def test_the_panel_picture_is_drawn_from_a_real_demo_run(tmp_path):
    out = tmp_path / "panel.svg"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "panel_svg.py"), "--steps", "30", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    svg = out.read_text(encoding="utf-8")
    assert svg.startswith("<svg") and "loss" in svg and "skipped" in svg and "fp16" in svg


def _section(page: str, heading: str) -> str:
    return (DOCS / page).read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_copied_cores_reference_lists_every_argument_and_setting_with_its_default():
    """docs/copying-the-core.md's "The session's arguments" against the code: AmpSession's signature (its code
    line and a table row per named argument) and a row for every field of AmpSettings (nested ones dotted, as
    ``scaler.init_scale``) whose default, read as Python, is the field's default."""
    import ast
    import dataclasses
    import importlib.util

    core = REPO / "template" / "src" / "project" / "amp"
    section = _section("copying-the-core.md", "The session's arguments")
    init = next(n for n in ast.walk(ast.parse((core / "session.py").read_text(encoding="utf-8")))
                if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    documented = re.search(r"^AmpSession\((.*)\)$", section, re.M).group(1)
    shown = ast.parse(f"def f({documented}): pass").body[0].args

    def params(a: ast.arguments) -> list[tuple[str, str]]:
        plain = [x for x in a.args if x.arg != "self"]
        pairs = [(x.arg, ast.unparse(d)) for x, d in zip(plain, [None] * (len(plain) - len(a.defaults)) + a.defaults,
                                                           strict=True) if d is not None]
        return pairs + [(x.arg, ast.unparse(d)) for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]

    assert params(shown) == params(init.args) and (shown.vararg, init.args.vararg) == (None, None)
    assert shown.kwarg is not None and init.args.kwarg is not None
    for name, _ in params(init.args):
        assert f"\n| `{name}` |" in section, f"no row for AmpSession's {name}"

    spec = importlib.util.spec_from_file_location("amp_settings_for_docs", core / "settings.py")
    settings = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(settings)  # torch-free by design
    rows = dict(re.findall(r"^\| `([a-z_.0-9]+)` \| `([^`]+)` \|", section, re.M))

    def fields(obj: object, prefix: str = "") -> dict[str, object]:
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out.update(fields(value, f"{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name: value})
        return out

    for name, default in fields(settings.AmpSettings()).items():
        assert name in rows, f"AmpSettings.{name} has no row in the session's arguments"
        assert eval(rows[name]) == default, f"{name}: the docs say {rows[name]}, the code {default!r}"  # noqa: S307


def test_no_page_shows_a_path_of_the_machine_it_was_written_on():
    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        found = re.findall(r"(?<![\w.~])/(?:work|home|root|Users)/[\w./-]+", page.read_text(encoding="utf-8"))
        assert not found, f"{page.name} shows a path of its author's machine: {found[:3]}"
