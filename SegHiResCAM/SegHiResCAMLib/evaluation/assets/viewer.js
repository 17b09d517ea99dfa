// SegHiResCAM's 3D viewer: the image with each heatmap as a switchable overlay (NiiVue, offline).
// Reads the JSON block #seghirescam-viewer-data: {image: {name, base64}, overlays: [{label, name, base64}]}.
// window.seghirescamViewer = {ready: Promise, show(index)} lets pages and tests switch overlays.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("seghirescam-viewer-data").textContent);
  const status = document.getElementById("seghirescam-viewer-status");
  const say = (text) => { if (status) status.textContent = text; };
  let nv = null;

  function show(index) {
    // Volume 0 is the image; overlay n is volume n + 1. Exactly one overlay is visible.
    data.overlays.forEach((_, n) => {
      nv.volumes[n + 1].colorbarVisible = n === index;  // one colour bar: the visible map's
      nv.setOpacity(n + 1, n === index ? data.opacity : 0.0);
    });
    const radio = document.getElementById("seghirescam-overlay-" + index);
    if (radio) radio.checked = true;
    say("showing " + data.overlays[index].label);
  }

  async function start() {
    if (typeof niivue === "undefined") {
      throw new Error("the NiiVue script (niivue.umd.js) did not load; keep it beside this page");
    }
    nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], isColorbar: true, show3Dcrosshair: true,
                             crosshairColor: [0.2, 0.9, 1.0, 1.0], logLevel: "error" });
    await nv.attachToCanvas(document.getElementById("seghirescam-viewer-canvas"));
    const image = await niivue.NVImage.loadFromBase64({ base64: data.image.base64, name: data.image.name,
                                                        colormap: "gray" });
    image.colorbarVisible = false;
    nv.addVolume(image);
    for (const overlay of data.overlays) {
      const volume = await niivue.NVImage.loadFromBase64({ base64: overlay.base64, name: overlay.name,
                                                           colormap: overlay.colormap || "inferno",
                                                           opacity: 0.0, cal_min: overlay.cal_min,
                                                           cal_max: overlay.cal_max });
      nv.addVolume(volume);
    }
    nv.setSliceType(nv.sliceTypeMultiplanar);
    if (data.crosshair) nv.scene.crosshairPos = nv.mm2frac(data.crosshair);
    const list = document.getElementById("seghirescam-viewer-overlays");
    data.overlays.forEach((overlay, n) => {
      const label = document.createElement("label");
      const radio = document.createElement("input");
      radio.type = "radio";
      radio.name = "seghirescam-overlay";
      radio.id = "seghirescam-overlay-" + n;
      radio.addEventListener("change", () => show(n));
      label.appendChild(radio);
      label.appendChild(document.createTextNode(" " + overlay.label));
      list.appendChild(label);
    });
    if (data.overlays.length) show(0);
    nv.drawScene();
  }

  const ready = start().catch((error) => {
    say("the 3D view could not start: " + error.message);
    console.error(error);
    throw error;
  });
  window.seghirescamViewer = { ready: ready, show: (index) => { show(index); nv.drawScene(); } };
})();
