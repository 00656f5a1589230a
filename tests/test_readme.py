from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current).strip())
            inside, current = not inside and line.strip() == "```bash", []
        elif inside:
            current.append(line)
    return blocks


def test_readme_opens_with_setup_demo_and_test_commands_and_ci_runs_the_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    demo, tests = blocks[0], blocks[1]
    assert demo.endswith("wildssl demo") and "torch==2.13.0" in demo
    assert tests.endswith("python3 -m pytest") and "torch==2.13.0" in tests
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    assert tests in ci_lines
