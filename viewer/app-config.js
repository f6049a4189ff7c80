/** @type {AppTypes.Config} */
// OHIF 3.13 configuration for orthanc-ai (SPDX-License-Identifier: AGPL-3.0-or-later).
//
// Served at /app-config.js by the viewer gateway (orthanc_plugin/viewer/gateway.py), which also forwards /dicom-web/ and /wado
// to Orthanc. Viewer and DICOMweb therefore share one origin: Orthanc 1.10 has no CORS option, and
// the BulkDataURIs Orthanc writes into the metadata (built from the forwarded Host header) point
// back at this same origin.
const origin = window.location.origin;

window.config = {
  name: 'orthanc-ai',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // Results of a research model: keep OHIF's "investigational use" notice.
  investigationalUseDialog: { option: 'always' },
  maxNumRequests: {
    interaction: 100,
    thumbnail: 25,
    prefetch: 25,
  },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (orthanc-ai)',
        name: 'orthanc',
        qidoRoot: `${origin}/dicom-web`,
        wadoRoot: `${origin}/dicom-web`,
        wadoUriRoot: `${origin}/wado`,
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        // Orthanc's DICOMweb plugin answers multipart/related only.
        omitQuotationForMultipartRequest: true,
        // Orthanc writes BulkDataURIs for large attributes (its "Full" metadata); OHIF fetches them.
        bulkDataURI: { enabled: true },
        // A reviewer's corrected segmentation is stored here by STOW-RS (Segmentation panel,
        // Export > DICOM SEG > Save; the viewer proxy lets only this origin's pages store).
        // As a BINARY SEG, uncompressed: OHIF 3.13's default, a LABELMAP SEG in RLE, leaves out
        // the per-frame FrameContentSequence that the standard requires and the plugin's
        // reader (highdicom) needs.
        segmentation: {
          store: { defaultMode: 'bitmap', transferSyntaxUID: '1.2.840.10008.1.2.1' },
        },
      },
    },
  ],
};
