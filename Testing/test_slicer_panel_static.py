"""Static checks of the panel's wiring that only Slicer could run (ast and xml, no Slicer needed).

Each guards a defect read from Slicer's and CTK's sources (issue 10): the model field's
validator, the output selector's filter, the self-test that must never install torch, the
extension's category.
"""

from __future__ import annotations

import ast
import json
import re

from test_slicer_module_static import MODULE_FILE, ROOT, class_def, top_cmake, ui_widgets


def method(class_name: str, name: str) -> ast.FunctionDef:
    return next(n for n in class_def(class_name).body if isinstance(n, ast.FunctionDef) and n.name == name)


def calls(node: ast.AST, attribute: str) -> list[ast.Call]:
    return [c for c in ast.walk(node) if isinstance(c, ast.Call) and getattr(c.func, "attr", None) == attribute]


def test_the_model_field_accepts_files_and_folders_and_is_bound_by_hand():
    field = ui_widgets()["modelPathLineEdit"]
    properties = {p.get("name") for p in field.findall("property")}
    # CTK turns name filters into a case-sensitive validator of file extensions
    # (ctkUtils.cpp nameFiltersToRegExpPattern): a folder or "model.PT" is never accepted,
    # and ctkPathLineEdit emits currentPathChanged only for accepted text.
    assert "nameFilters" not in properties
    assert "SlicerParameterName" not in properties, "bound by hand: folders and an emptied field must reach the node"
    folder_button = ui_widgets()["modelFolderButton"]
    assert folder_button.get("class") == "QToolButton"
    setup = method("SegHiResCAMWidget", "setup")
    connected = {ast.literal_eval(c.args[0]) for c in calls(setup, "connect") if c.args and isinstance(c.args[0], ast.Constant)}
    assert {"currentPathChanged(QString)", "validInputChanged(bool)", "clicked()"} <= connected
    assert calls(method("SegHiResCAMWidget", "onBrowseModelFolder"), "getExistingDirectory")
    assert calls(method("SegHiResCAMWidget", "_startJob"), "addCurrentPathToHistory")


def test_the_output_selector_lists_only_heatmaps_this_module_made():
    # qMRMLNodeComboBox.addAttribute is a Q_INVOKABLE, not a property: it is called in setup().
    (call,) = [c for c in calls(method("SegHiResCAMWidget", "setup"), "addAttribute")
               if ast.unparse(c.func.value) == "self.ui.outputHeatmapSelector"]
    assert [ast.unparse(a) for a in call.args] == ["'vtkMRMLScalarVolumeNode'", "HEATMAP_ATTRIBUTE", "'1'"]


def test_the_self_test_skips_without_torch_and_never_installs_it():
    run_test = method("SegHiResCAMTest", "runTest")
    first = run_test.body[0]
    assert isinstance(first, ast.If) and "torchAvailable" in ast.unparse(first.test)
    assert any(isinstance(n, ast.Return) for n in first.body) and calls(first, "warning")
    ensure = ast.unparse(method("SegHiResCAMLogic", "ensureTorch"))
    assert ensure.index("testingEnabled()") < ensure.index("installTorch("), "testing mode must refuse before installing"
    assert "askConfirmation=not slicer.app.testingEnabled()" not in ast.unparse(method("SegHiResCAMLogic", "process"))


def test_the_missing_segment_self_test_asserts_the_exact_error_class():
    source = ast.unparse(method("SegHiResCAMTest", "test_missing_segment_gives_clear_error_and_no_node"))
    assert "assertRaises(InputError)" in source and "assertIs(type(caught.exception), InputError)" in source
    assert "SegHiResCAMError" not in source  # MissingDependencyError is one too: it would pass for the wrong reason


def test_the_extension_category_is_the_same_in_cmake_and_the_index_entry():
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', top_cmake())
    entry = json.loads((ROOT / "extension_meta.json").read_text(encoding="utf-8"))
    assert category and category.group(1) == entry["category"] == "Segmentation"
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in MODULE_FILE.read_text(encoding="utf-8")


def test_the_layer_listing_never_blocks_the_panel():
    # Issue 10: the panel waited for a worker process (and torch) to start on every model change.
    refresh = ast.unparse(method("SegHiResCAMWidget", "_refreshLayerList"))
    for blocking in (".wait(", "describeLayers(", "layerListing(", "setOverrideCursor"):
        assert blocking not in refresh, blocking
    assert "startLayerListing(" in refresh and "_layerTimer.start()" in refresh
    assert "wait(" not in ast.unparse(method("SegHiResCAMLogic", "startLayerListing"))
    poll = ast.unparse(method("SegHiResCAMWidget", "onPollLayers"))
    assert "job.poll()" in poll and "except Exception" in poll and "layer_choices(" in poll
    setup = method("SegHiResCAMWidget", "setup")
    connected = {ast.unparse(c.args[1]) for c in calls(setup, "connect") if len(c.args) == 2}
    assert {"self.onPollLayers", "self.onMethodsChanged"} <= connected
    for cleanup in ("cleanup", "onSceneStartClose"):
        assert calls(method("SegHiResCAMWidget", cleanup), "_cancelLayerJob")


def test_the_method_list_is_the_catalogs_and_the_status_line_is_the_jobs_summary():
    fill = ast.unparse(method("SegHiResCAMWidget", "_fillMethodList"))
    assert "for method in CamMethod" in fill and "ItemIsUserCheckable" in fill
    assert "job.summary" in ast.unparse(method("SegHiResCAMWidget", "onPollJob"))
    settings = ast.unparse(method("SegHiResCAMLogic", "settingsFromParameterNode"))
    assert "p.methods" in settings and "markup_point_ras(p.regionPoint, p.inputVolume)" in settings
