//! The configs shipped in `deploy/` and in the Helm chart stay valid as the config model
//! evolves.

use std::path::Path;

use skein_node::parse_config_text;

fn repository_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn the_example_config_is_valid() {
    let validated = parse_config_text(
        &repository_file("deploy/skein.example.yaml"),
        "deploy/skein.example.yaml",
    )
    .expect("valid");
    let config = validated.config();
    assert!(
        config
            .routes
            .iter()
            .any(|route| !route.fallbacks.is_empty()),
        "the example shows fallbacks"
    );
}

#[test]
fn the_helm_chart_default_config_is_valid() {
    let values: serde_norway::Value =
        serde_norway::from_str(&repository_file("helm/skein/values.yaml")).expect("values.yaml");
    let config = values
        .get("config")
        .and_then(serde_norway::Value::as_str)
        .expect("values.config is a string");
    parse_config_text(config, "helm values.config").expect("valid");
}

/// The node writes its Raft data under --data-dir: the chart and the image must point it at a
/// writable place (the chart's root filesystem is read-only).
#[test]
fn the_chart_and_the_image_give_the_node_a_writable_data_dir() {
    let statefulset = repository_file("helm/skein/templates/statefulset.yaml");
    assert!(statefulset.contains("--data-dir=/var/lib/skein"));
    assert!(statefulset.contains("mountPath: /var/lib/skein"));
    assert!(statefulset.contains("readOnlyRootFilesystem: true"));
    let dockerfile = repository_file("deploy/Dockerfile");
    assert!(dockerfile.contains("\"--data-dir\", \"/var/lib/skein\""));
    assert!(dockerfile.contains("chown 65532:65532 /var/lib/skein"));
}
