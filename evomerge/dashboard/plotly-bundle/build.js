// plotly.js's own esbuild settings (its esbuild-config.js), minified, for entry.js.
const esbuild = require('esbuild');
const { environmentPlugin } = require('esbuild-plugin-environment');
const { glsl } = require('esbuild-plugin-glsl');
const InlineCSSPlugin = require('esbuild-plugin-inline-css');

const version = require('plotly.js/package.json').version;
esbuild.build({
    entryPoints: [require('path').join(__dirname, 'entry.js')],
    outfile: process.argv[2] || 'plotly.min.js',
    format: 'iife',
    globalName: 'Plotly',
    bundle: true,
    minify: true,
    sourcemap: false,
    legalComments: 'eof',
    banner: { js: `/*! plotly.js v${version}, partial bundle (scatter, scattergl, bar, heatmap) built by ` +
                  'evomerge/dashboard/plotly-bundle; MIT license, see plotly.LICENSE.txt */' },
    plugins: [InlineCSSPlugin(), glsl({ minify: true }), environmentPlugin({ NODE_DEBUG: false })],
    alias: { regl: '@plotly/regl', stream: 'stream-browserify' },
    define: { global: 'window', 'define.amd': 'false' },
    target: 'es2016',
    logLevel: 'info',
}).catch(() => process.exit(1));
