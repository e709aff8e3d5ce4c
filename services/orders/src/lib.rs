//! Orders: an example application service, built only on `tenantmesh-app`.
//! Each call sees its caller's tenant's orders only; no handler names a
//! tenant. See the README's "Build your own service".

use tenantmesh_app::mesh::data::v1::{GetItemRequest, data_client::DataClient};
use tenantmesh_app::{Condition, TenantContext, TenantTable, Violations, storage_status};
use tonic::{Request, Response, Status};

pub mod proto {
    tonic::include_proto!("example.orders.v1");
    /// The compiled protos, with their policies (for `App::new`).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orders_descriptor");
}
use proto::{orders_server::OrdersServer, *};

/// Declares the service: its name, protos and table.
pub fn app() -> Result<tenantmesh_app::App, tenantmesh_app::AppError> {
    tenantmesh_app::App::new("orders", proto::FILE_DESCRIPTOR_SET)?.table("orders")
}

/// The service, on the tables of `ctx`, reading products from the data
/// service at `data_url` as the caller.
pub fn routes(
    ctx: &tenantmesh_app::Context,
    data_url: &str,
) -> Result<tonic::service::Routes, tenantmesh_app::AppError> {
    let orders = Orders { tables: ctx.tables().clone(), data: tenantmesh_app::client::connect(data_url)? };
    Ok(tonic::service::Routes::new(tenantmesh_app::sized!(OrdersServer::new(orders))))
}

pub struct Orders {
    tables: tenantmesh_app::Tables,
    data: tenantmesh_app::client::PropagatedChannel,
}

fn check_id(v: &mut Violations, field: &str, id: &str) {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        v.add(field, "must be 1-64 of letters, digits and _.-");
    }
}

/// The order stored at `key`, with its version.
fn decode(item: tenantmesh_app::Item) -> Result<Order, Status> {
    let mut order: Order = prost::Message::decode(item.data.as_slice()).map_err(|_| Status::data_loss("order"))?;
    order.version = item.version;
    Ok(order)
}

async fn read(table: &TenantTable, id: &str) -> Result<Order, Status> {
    match table.get(id).await.map_err(storage_status)? {
        Some(item) => decode(item),
        None => Err(Status::not_found(format!("no order {id}"))),
    }
}

#[tonic::async_trait]
impl orders_server::Orders for Orders {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let table = self.tables.of(&request, "orders").await?;
        let created_by = TenantContext::from_request(&request)?.subject.to_string();
        let req = request.into_inner();
        let mut v = Violations::new();
        check_id(&mut v, "order_id", &req.order_id);
        check_id(&mut v, "product_id", &req.product_id);
        if !(1..=1000).contains(&req.quantity) {
            v.add("quantity", "must be 1-1000");
        }
        v.check()?;
        // The product, from the data service, as the caller: only the
        // caller's tenant's catalog can answer.
        let mut data = tenantmesh_app::sized!(DataClient::new(self.data.clone()));
        let product = GetItemRequest { collection: "products".into(), id: req.product_id.clone() };
        if let Err(s) = data.get_item(product).await {
            return Err(match s.code() {
                tonic::Code::NotFound => Status::failed_precondition(format!("no product {}", req.product_id)),
                _ => s,
            });
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let order = Order {
            order_id: req.order_id.clone(),
            product_id: req.product_id,
            quantity: req.quantity,
            status: OrderStatus::Placed.into(),
            created_at: now.as_millis() as i64,
            created_by,
            version: 0,
        };
        let order = match table.put(&req.order_id, prost::Message::encode_to_vec(&order), Condition::NotExists).await {
            Ok(version) => Order { version, ..order },
            // A retry of the same order returns it; another order by that id is refused.
            Err(e) if e.condition_failed() => {
                let existing = read(&table, &req.order_id).await?;
                if (&existing.product_id, existing.quantity) != (&order.product_id, order.quantity) {
                    return Err(Status::already_exists(format!("order {} exists with other contents", req.order_id)));
                }
                existing
            }
            Err(e) => return Err(storage_status(e)),
        };
        Ok(Response::new(CreateOrderResponse { order: Some(order) }))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        let table = self.tables.of(&request, "orders").await?;
        let mut v = Violations::new();
        check_id(&mut v, "order_id", &request.get_ref().order_id);
        v.check()?;
        Ok(Response::new(GetOrderResponse { order: Some(read(&table, &request.get_ref().order_id).await?) }))
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let table = self.tables.of(&request, "orders").await?;
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.page_size > 100 {
            v.add("page_size", "must be at most 100");
        }
        if !req.page_token.is_empty() {
            check_id(&mut v, "page_token", &req.page_token);
        }
        v.check()?;
        let limit = if req.page_size == 0 { 20 } else { req.page_size as usize };
        let after = Some(req.page_token.as_str()).filter(|t| !t.is_empty());
        let page = table.query("", after, limit).await.map_err(storage_status)?;
        let orders = page.items.into_iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(ListOrdersResponse { orders, next_page_token: page.last_evaluated.unwrap_or_default() }))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        let table = self.tables.of(&request, "orders").await?;
        let mut v = Violations::new();
        check_id(&mut v, "order_id", &request.get_ref().order_id);
        v.check()?;
        let mut order = read(&table, &request.get_ref().order_id).await?;
        if order.status() != OrderStatus::Cancelled {
            order.set_status(OrderStatus::Cancelled);
            let written =
                table.put(&order.order_id, prost::Message::encode_to_vec(&order), Condition::Version(order.version));
            order.version = written.await.map_err(storage_status)?;
        }
        Ok(Response::new(CancelOrderResponse { order: Some(order) }))
    }
}
