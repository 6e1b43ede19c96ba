//! The ModuleDescriptor and DeploymentDescriptor that Okapi and Eureka register, rendered from
//! the templates in `descriptors/` with this build's module id, version and image
//! (`mod-pubsub descriptors`). The templates keep FOLIO's `${artifactId}` and `${version}`
//! placeholders, as the Java module's do.

use serde_json::Value;

pub const ARTIFACT_ID: &str = "mod-pubsub";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

const MODULE_TEMPLATE: &str = include_str!("../descriptors/ModuleDescriptor-template.json");
const DEPLOYMENT_TEMPLATE: &str = include_str!("../descriptors/DeploymentDescriptor-template.json");

/// The image FOLIO's release builds push: `folioorg/mod-pubsub:<version>`.
pub fn default_image() -> String {
    format!("folioorg/{ARTIFACT_ID}:{VERSION}")
}

/// Both descriptors, ready to post to Okapi (`/_/proxy/modules`, `/_/discovery/modules`).
pub struct Descriptors {
    pub module: Value,
    pub deployment: Value,
}

/// Fills the templates' placeholders; the ModuleDescriptor's `launchDescriptor` runs `image`.
pub fn render(image: &str) -> Descriptors {
    let fill = |template: &str| -> Value {
        let text = template
            .replace("${artifactId}", ARTIFACT_ID)
            .replace("${version}", VERSION);
        // The templates are part of the binary and checked by the tests.
        serde_json::from_str(&text).expect("descriptor templates are JSON")
    };
    let mut module = fill(MODULE_TEMPLATE);
    module["launchDescriptor"]["dockerImage"] = Value::String(image.to_owned());
    Descriptors {
        module,
        deployment: fill(DEPLOYMENT_TEMPLATE),
    }
}
