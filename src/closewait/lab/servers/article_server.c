/*
 * The C server from the article closewait grew from (a Chinese blog post about CLOSE_WAIT),
 * kept verbatim except for three changes, all needed to run it inside `closewait lab`:
 *
 *   1. #include <stdio.h> is added: the article's text lacks it and gcc needs it for printf/perror.
 *   2. The port comes from argv[1] (default: the article's 12345). The lab passes 0, so the kernel
 *      picks a free port and the lab never collides with anything else on the machine; it finds
 *      the port with closewait's own scanner (the listening socket owned by this pid).
 *   3. It binds 127.0.0.1 (INADDR_LOOPBACK) instead of INADDR_ANY, so the lab keeps its promise to
 *      talk only over loopback: nobody on the network can be the one client it accepts.
 *
 * Everything else is the article's logic: accept ONE client, loop recv() + sleep(1) + printf, break
 * only when recv() returns a negative value (never on 0, the peer's FIN), and never close(client_fd).
 * That is the CLOSE_WAIT leak: once the client is gone recv() returns 0 forever and the kernel keeps
 * the connection in CLOSE_WAIT because the owner never closes it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#define PORT 12345
#define BUFFER_SIZE 1024
#include <signal.h>

void sigpipe_handler(int sig) {
  printf("SIGPIPE received!\n");
}


int main(int argc, char *argv[]) {
  // closewait lab: port from argv[1] instead of the fixed PORT (0 = let the kernel pick one)
  int port = argc > 1 ? atoi(argv[1]) : PORT;
  // 在程序开始时设置信号处理函数
  signal(SIGPIPE, sigpipe_handler);
  int server_fd, client_fd;
  struct sockaddr_in server_addr, client_addr;
  socklen_t client_addr_len = sizeof(client_addr);
  char buffer[BUFFER_SIZE];

  // 创建 socket
  server_fd = socket(AF_INET, SOCK_STREAM, 0);
  if (server_fd < 0) {
    perror("socket");
    exit(EXIT_FAILURE);
  }

  // 绑定地址
  memset(&server_addr, 0, sizeof(server_addr));
  server_addr.sin_family = AF_INET;
  // closewait lab: loopback only (the article has INADDR_ANY)
  server_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  server_addr.sin_port = htons(port);

  if (bind(server_fd, (struct sockaddr*)&server_addr, sizeof(server_addr)) < 0) {
    perror("bind");
    close(server_fd);
    exit(EXIT_FAILURE);
  }

  // 监听连接
  if (listen(server_fd, 1) < 0) {
    perror("listen");
    close(server_fd);
    exit(EXIT_FAILURE);
  }

  printf("Server is listening on port %d\n", port);

  // 接受连接
  client_fd = accept(server_fd, (struct sockaddr*)&client_addr, &client_addr_len);
  if (client_fd < 0) {
    perror("accept");
    close(server_fd);
    exit(EXIT_FAILURE);
  }

  printf("Client connected, %d\n", client_fd);

  // 读取客户端数据(保持连接)
  while (1) {
    ssize_t bytes_received = recv(client_fd, buffer, BUFFER_SIZE - 1, 0);
    if (bytes_received < 0) {
      perror("recv");
      break;
    }
    sleep(1);

    buffer[bytes_received] = '\0';
    printf("Received: %ld, %s\n", bytes_received, buffer);
    // send(client_fd, "pong", 4, 0);
  }

  // 关闭连接(模拟 CLOSE_WAIT 状态)
  // 注意:不关闭 socket,将导致进入 CLOSE_WAIT 状态
  // close(client_fd);

  // 关闭 server socket
  close(server_fd);

  return 0;
}
