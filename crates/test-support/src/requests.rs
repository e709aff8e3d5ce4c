//! Building requests and reading replies.

use tonic::Status;
use tonic::transport::Channel;

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    req
}

/// A `google.protobuf.Struct` from string pairs.
pub fn attrs(pairs: &[(&str, &str)]) -> prost_types::Struct {
    prost_types::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue((*v).to_owned())) },
                )
            })
            .collect(),
    }
}

/// An unconditional PutItem of item `id` of collection `c` whose string
/// attribute `v` is `value`.
pub fn put_v(id: &str, value: &str) -> tenantmesh_proto::data::v1::PutItemRequest {
    tenantmesh_proto::data::v1::PutItemRequest {
        collection: "c".into(),
        id: id.into(),
        attributes: Some(attrs(&[("v", value)])),
        expected_version: None,
    }
}

/// How many items of `tenant_id` `DataAdmin.ExportItems` streams from
/// `table`, called with the service `token`.
pub async fn exported_items(
    admin: &mut tenantmesh_proto::data::v1::data_admin_client::DataAdminClient<Channel>,
    token: &str,
    tenant_id: &str,
    table: &str,
) -> Result<usize, Status> {
    use tenantmesh_proto::data::v1::{ExportItemsRequest, StoreRef};
    let req = ExportItemsRequest {
        store: Some(StoreRef { tenant_id: tenant_id.into(), table: table.into() }),
        ..Default::default()
    };
    let mut stream = admin.export_items(authed(req, token)).await?.into_inner();
    let mut n = 0;
    while let Some(batch) = stream.message().await? {
        n += batch.items.len();
    }
    Ok(n)
}
