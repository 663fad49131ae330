// Opening a listening TCP socket from "host:port" for peerd's two ports, with errors that name
// the address and the port's purpose. No LibTorch.
#pragma once

#include <boost/asio.hpp>

#include <string>

#include "core/host_port.h"
#include "core/status.h"

namespace peerd {

// Binds `acceptor` to `listen` ("127.0.0.1:7070", "[::1]:7070", "localhost:7070"; port 0 picks a
// free one) and listens; *port is the port in use and *bound the address really bound, as
// "127.0.0.1:40123" or "[::1]:40123". `what` names the port in messages ("the data port").
inline Status Listen(boost::asio::ip::tcp::acceptor& acceptor, const std::string& listen, const std::string& what,
                     uint16_t* port, std::string* bound) {
  std::string host;
  if (Status st = ParseHostPort(listen, &host, port); !st.ok()) return st;
  // "localhost" is loopback by definition (RFC 6761); peerd binds IPv4's, not whatever a resolver says.
  if (host == "localhost") host = "127.0.0.1";
  boost::system::error_code ec;
  auto address = boost::asio::ip::make_address(host, ec);
  if (ec)
    return Status::InvalidArgument(what + " address '" + host + "' is not an IP address (e.g. 127.0.0.1, [::1] or " +
                                   "localhost): " + ec.message());
  boost::asio::ip::tcp::endpoint endpoint(address, *port);
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(boost::asio::ip::tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(boost::asio::socket_base::max_listen_connections, ec);
  if (ec) return Status::IOError("cannot listen on " + listen + " for " + what + ": " + ec.message());
  const auto local = acceptor.local_endpoint();
  *port = local.port();
  const std::string ip = local.address().to_string();
  *bound = (local.address().is_v6() ? "[" + ip + "]" : ip) + ":" + std::to_string(*port);
  return Status::OK();
}

}  // namespace peerd
