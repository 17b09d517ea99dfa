"""Static checks of the Slicer face: .ui <-> parameter node, CMake listing, index entry, icons.

These read files only (ast, xml, json): Slicer, qt and the parameter node wrapper are not
needed, so they run in plain pytest and catch what would otherwise break only inside Slicer
or on the extensions build machines.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SegHiResCAM"
MODULE_FILE = MODULE_DIR / "SegHiResCAM.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SegHiResCAM.ui"
SCHEMA = Path(__file__).parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"

# Which widget classes the parameter node wrapper can bind to which field types
# (Slicer's parameterNodeWrapper/guiConnectors.py, canRepresent methods).
WIDGETS_FOR_TYPE = {
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider", "ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "qMRMLSpinBox"},
    "enum": {"QComboBox", "ctkComboBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def class_def(name: str) -> ast.ClassDef:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"{MODULE_FILE.name} defines no class {name}")


def parameter_fields() -> dict[str, str]:
    """Field name -> annotation source, from the @parameterNodeWrapper class."""
    cls = class_def("SegHiResCAMParameterNode")
    decorators = [ast.unparse(d) for d in cls.decorator_list]
    assert "parameterNodeWrapper" in decorators
    return {
        stmt.target.id: ast.unparse(stmt.annotation)
        for stmt in cls.body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    }


def enum_names() -> set[str]:
    return {
        node.name
        for node in module_tree().body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in node.bases)
    }


def hand_bound() -> tuple[str, ...]:
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HAND_BOUND_PARAMETERS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("SegHiResCAM.py must declare HAND_BOUND_PARAMETERS")


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def ui_bindings() -> dict[str, str]:
    """SlicerParameterName -> widget class, for every bound widget in the .ui."""
    bindings = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.findtext("string")
                assert name not in bindings, f"two widgets bind '{name}'"
                assert prop.get("stdset") == "0", f"'{name}' must be a dynamic property (stdset=\"0\")"
                bindings[name] = widget.get("class")
    return bindings


def field_kind(annotation: str) -> str:
    base = re.sub(r"^Annotated\[(\w+(?:\.\w+)?),.*\]$", r"\1", annotation)
    if base.startswith("vtkMRML"):
        return "node"
    if base in ("pathlib.Path", "Path"):
        return "Path"
    if base in enum_names():
        return "enum"
    return base


# -- .ui <-> parameter node ------------------------------------------------------------------


def test_every_ui_binding_is_a_parameter_field_and_every_field_is_bound():
    fields = set(parameter_fields())
    bound = set(ui_bindings())
    manual = set(hand_bound())
    assert bound - fields == set(), "SlicerParameterName without a parameter node field"
    assert fields - bound - manual == set(), "parameter node fields bound to no widget"
    assert manual <= fields and not (manual & bound), "hand-bound fields must be fields and not bound in the .ui"


def test_each_bound_widget_can_represent_its_field_type():
    fields = parameter_fields()
    for name, widget_class in ui_bindings().items():
        kind = field_kind(fields[name])
        assert widget_class in WIDGETS_FOR_TYPE[kind], f"'{name}' ({fields[name]}) cannot bind to a {widget_class}"


def test_hand_bound_fields_have_their_widgets_in_the_ui():
    widgets = ui_widgets()
    assert widgets["layerComboBox"].get("class") == "QComboBox"
    assert widgets["roiSegmentSelector"].get("class") == "qMRMLSegmentSelectorWidget"
    assert widgets["methodsListWidget"].get("class") == "QListWidget"
    source = MODULE_FILE.read_text(encoding="utf-8")
    for field in hand_bound():
        assert f"_parameterNode.{field} = " in source, f"the widget never writes the hand-bound field '{field}'"


def test_every_mrml_widget_receives_the_scene():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget").get("name")
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    mrml = {name for name, w in ui_widgets().items() if w.get("class", "").startswith("qMRML") and name != top}
    assert mrml and mrml <= receivers, f"widgets without setMRMLScene: {sorted(mrml - receivers)}"


def test_widgets_the_code_uses_exist_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    missing = used - set(ui_widgets())
    assert not missing, f"SegHiResCAM.py uses widgets the .ui lacks: {sorted(missing)}"


def enum_values(name: str) -> list[str]:
    """The member values of an enum class in SegHiResCAM.py, in order."""
    return [ast.literal_eval(stmt.value) for stmt in class_def(name).body
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)]


@pytest.mark.parametrize("enum, choices", [("CamMethod", "METHOD_CHOICES"), ("TargetKind", "TARGET_CHOICES"),
                                           ("ComputeDevice", "DEVICE_CHOICES"), ("RegionKind", "REGION_CHOICES")])
def test_the_panels_choices_are_the_catalogs_in_its_order(enum, choices):
    from SegHiResCAMLib import catalog

    assert enum_values(enum) == list(catalog.names(getattr(catalog, choices)))
    label = next(n for n in class_def(enum).body if isinstance(n, ast.FunctionDef) and n.name == "label")
    assert repr(choices) in ast.unparse(label), "labels come from the catalog"


def test_the_target_threshold_widget_stays_strictly_inside_zero_to_one():
    widget = ui_widgets()["targetThresholdSliderWidget"]
    values = {p.get("name"): float(p.findtext("double")) for p in widget.findall("property") if p.find("double") is not None}
    annotation = parameter_fields()["targetThreshold"]
    low, high = (float(v) for v in re.search(r"WithinRange\(([\d.]+), ([\d.]+)\)", annotation).groups())
    assert 0.0 < values["minimum"] == low < values["value"] < values["maximum"] == high < 1.0


def test_the_logic_reads_every_explanation_and_display_choice_in_one_place():
    cls = class_def("SegHiResCAMLogic")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "settingsFromParameterNode")
    read = {node.attr for node in ast.walk(method) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "p"}
    # The job's inputs (the input volume is read too: a point is read in its frame).
    inputs = {"modelPath", "roiSegmentation", "roiSegmentId", "outputHeatmap", "extraVolume1", "extraVolume2",
              "extraVolume3"}
    assert read == set(parameter_fields()) - inputs
    widget = class_def("SegHiResCAMWidget")
    calls = {ast.unparse(node.func) for node in ast.walk(widget) if isinstance(node, ast.Call)}
    assert "self.logic.settingsFromParameterNode" in calls and "self.logic.start" in calls


# -- module file hygiene ---------------------------------------------------------------------


def module_scope_imports(tree: ast.Module) -> set[str]:
    """Top-level module names imported at module scope (also inside top-level if/try blocks)."""
    names = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack.extend(ast.iter_child_nodes(node))
    return names


def test_module_file_imports_no_torch_or_library_at_module_scope():
    imports = module_scope_imports(module_tree())
    assert "torch" not in imports
    # The library may pull torch through its modules; Slicer's module scan must stay light.
    assert imports <= {"enum", "importlib", "logging", "os", "pathlib", "shutil", "sys", "typing",
                       "qt", "ctk", "slicer", "vtk"}, imports


def test_module_scope_import_check_sees_a_hidden_torch_import():
    tree = ast.parse("import os\ntry:\n    import torch.nn as nn\nexcept ImportError:\n    pass\n")
    assert "torch" in module_scope_imports(tree)


def test_logic_process_has_the_documented_console_signature():
    cls = class_def("SegHiResCAMLogic")
    process = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "process")
    names = [a.arg for a in process.args.args]
    assert names[:5] == ["self", "inputVolume", "modelPath", "segmentationNode", "segmentId"]
    for keyword in ("outputVolume", "layer", "targetClass", "method", "device", "waitForCompletion"):
        assert keyword in names
    defaults = dict(zip(names[-len(process.args.defaults):], process.args.defaults))
    assert ast.literal_eval(defaults["device"]) == "auto" and ast.literal_eval(defaults["waitForCompletion"]) is True
    start = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "start")
    assert [a.arg for a in start.args.args][:4] == ["self", "inputVolume", "modelPath", "settings"]


def test_module_metadata_cites_both_papers_and_explains_limits():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "Rheude" in source and "2024" in source and "Vinogradova" in source and "2020" in source
    assert "What it does not show" in source
    test_class = class_def("SegHiResCAMTest")
    assert any(isinstance(n, ast.FunctionDef) and n.name == "runTest" for n in test_class.body)


def test_torch_is_never_pip_installed():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert not re.search(r"pip_install\([^)]*torch", source)
    assert "PyTorchUtils" in source


# -- packaging -------------------------------------------------------------------------------


def files_in_git(folder: str) -> list[str]:
    """Tracked plus untracked-but-not-ignored files under ``folder`` (what a commit would ship)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", folder],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [f for f in listed if (ROOT / f).is_file()]


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...)"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


def test_module_cmakelists_lists_every_library_file_and_resource():
    text = module_cmake()
    scripts = {s.replace("${MODULE_NAME}", "SegHiResCAM") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    resources = set(cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    prefix = "SegHiResCAM/"
    shipped_py = {f[len(prefix):] for f in files_in_git(prefix + "SegHiResCAMLib") if f.endswith(".py")}
    shipped_res = {
        f[len(prefix):]
        for f in files_in_git(prefix + "Resources") + files_in_git(prefix + "SegHiResCAMLib/data")
    }
    missing = sorted((shipped_py | {"SegHiResCAM.py"}) - scripts) + sorted(shipped_res - resources)
    assert not missing, "add to SegHiResCAM/CMakeLists.txt (Slicer ships nothing unlisted):\n  " + "\n  ".join(missing)
    absent = sorted(f for f in scripts | resources if not (MODULE_DIR / f).is_file())
    assert not absent, f"listed in SegHiResCAM/CMakeLists.txt but not on disk: {absent}"


def test_module_cmakelists_builds_with_generic_tests_and_registers_the_self_test():
    text = module_cmake()
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*?\)", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(Testing)" in text
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text().strip() == "add_subdirectory(Python)"


def top_cmake() -> str:
    return (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def test_top_level_cmakelists_declares_the_extension():
    text = top_cmake()
    assert re.search(r"^project\(SegHiResCAM\)", text, re.M)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(SegHiResCAM)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)


def test_extension_meta_json_is_a_valid_index_entry_matching_cmake():
    text = (ROOT / "extension_meta.json").read_bytes()
    assert b"\r" not in text and text.endswith(b"\n"), "LF line endings and a final newline"
    entry = json.loads(text)
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(entry, schema)  # additionalProperties: false also rejects extra keys
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["scm_url"].startswith("https://") and "/Slicer" in entry["scm_url"]
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', top_cmake()).group(1).split()
    assert entry.get("build_dependencies", []) == ([] if depends == ["NA"] else depends) == ["PyTorch"]
    # The index's prettier style: two-space indent, one array item per line.
    assert text.decode() == json.dumps(entry, indent=2, ensure_ascii=False) + "\n"


def test_schema_validation_rejects_an_extra_key():
    entry = json.loads((ROOT / "extension_meta.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**entry, "description": "not allowed here"}, schema)


@pytest.mark.parametrize("path", ["Resources/SegHiResCAM.png", "SegHiResCAM/Resources/Icons/SegHiResCAM.png"])
def test_icons_are_128_by_128_png(path):
    data = (ROOT / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_license_is_apache_2():
    assert "Apache License" in (ROOT / "LICENSE.txt").read_text() and "Version 2.0" in (ROOT / "LICENSE.txt").read_text()


@pytest.mark.parametrize(
    "path",
    ["CMakeLists.txt", "extension_meta.json", "SegHiResCAM/CMakeLists.txt", "SegHiResCAM/SegHiResCAM.py",
     "SegHiResCAM/Resources/UI/SegHiResCAM.ui"],
)
def test_slicer_files_have_lf_line_endings(path):
    assert b"\r\n" not in (ROOT / path).read_bytes()


def test_self_test_model_is_small_and_its_card_names_a_known_network():
    from SegHiResCAMLib.models.card import ModelCard

    models = MODULE_DIR / "Resources" / "Models"
    weights = models / "SelfTestBallUNet.pt"
    assert weights.stat().st_size < 200_000
    card = ModelCard.load(models / "SelfTestBallUNet.json")
    assert card.network["name"] == "SegHiResCAM.UNet" and card.class_names == ("background", "ball")
    assert card.default_layer == "decoder.0"
