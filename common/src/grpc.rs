//! The standard gRPC services both binaries serve next to their own:
//! server reflection (v1 and v1alpha, so grpcurl of every age works without
//! `.proto` files) and health.

use tonic::service::RoutesBuilder;

/// The name health checks use for the health service itself.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// The server reflection service, v1.
pub const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
/// The server reflection service, v1alpha (older grpcurl and tools).
pub const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Adds reflection v1 and v1alpha to `routes`, describing exactly the
/// services named in `served` (plus health and reflection themselves) from
/// the encoded descriptor sets in `descriptor_sets`.
///
/// Only served services are listed: the `ringcache.v1` descriptor set also
/// describes services that this binary does not serve, and `grpcurl list`
/// must not offer those.
pub fn add_reflection(
    routes: &mut RoutesBuilder,
    served: &[&str],
    descriptor_sets: &[&'static [u8]],
) -> anyhow::Result<()> {
    let builder = |reflection_name: &str| {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name(reflection_name);
        for set in descriptor_sets {
            b = b.register_encoded_file_descriptor_set(set);
        }
        for name in served {
            b = b.with_service_name(*name);
        }
        b
    };
    let v1 = builder(REFLECTION_V1).build_v1()?;
    let v1alpha = builder(REFLECTION_V1ALPHA).build_v1alpha()?;
    routes.add_service(v1).add_service(v1alpha);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_builds_from_the_ringcache_descriptors() {
        let mut routes = RoutesBuilder::default();
        add_reflection(
            &mut routes,
            &[ringcache_proto::service_names::CACHE],
            &[ringcache_proto::FILE_DESCRIPTOR_SET],
        )
        .unwrap();
    }
}
