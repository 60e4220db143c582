'use strict';
// The trace types the dashboard's pages draw (grep the static/*.js for `type:`); scatter is in the core.
var Plotly = require('plotly.js/lib/core');

Plotly.register([
    require('plotly.js/lib/scattergl'),
    require('plotly.js/lib/bar'),
    require('plotly.js/lib/heatmap'),
]);

module.exports = Plotly;
