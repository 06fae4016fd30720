/* Loopback connection churn for bench_recorder.py: connect, request, response, close, as fast as it goes.
 *
 *   churn server PORT WORKERS      listen on 127.0.0.1:PORT; WORKERS forked processes accept on it, each
 *                                  serving one connection at a time: read the request, answer, read
 *                                  to EOF (the socket is in CLOSE_WAIT), close() (-> LAST_ACK).
 *   churn client PORT SECONDS      connect, send a request, read the answer, close() first (the client
 *                                  end goes FIN_WAIT -> TIME_WAIT); repeat for SECONDS; print how many.
 *
 * Every connection makes about ten TCP state changes, two of them the CLOSE_WAIT edges the recorder
 * acts on. TIME_WAIT ports are reused on loopback (net.ipv4.tcp_tw_reuse=2, the default).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int serve(int port, int workers) {
    int one = 1;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 4096)) {
        perror("listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < workers; i++) {
        if (fork() == 0) {
            char buf[256];
            for (;;) {
                int conn = accept(listener, NULL, NULL);
                if (conn < 0) continue;
                if (read(conn, buf, sizeof buf) > 0) {
                    if (write(conn, "HTTP/1.0 200 OK\r\n\r\nok", 21) < 0) perror("write");
                }
                while (read(conn, buf, sizeof buf) > 0) {
                }
                close(conn);
            }
        }
    }
    while (wait(NULL) > 0) {
    }
    return 0;
}

static int client(int port, double seconds) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char buf[256];
    long done = 0, failed = 0;
    double end = now() + seconds;
    while (now() < end) {
        int sock = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(sock, (struct sockaddr *)&addr, sizeof addr) == 0 &&
            write(sock, "GET / HTTP/1.0\r\n\r\n", 18) == 18 && read(sock, buf, sizeof buf) > 0)
            done++;
        else
            failed++;
        close(sock);
    }
    printf("%ld %ld\n", done, failed);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "server") == 0) return serve(atoi(argv[2]), atoi(argv[3]));
    if (argc == 4 && strcmp(argv[1], "client") == 0) return client(atoi(argv[2]), atof(argv[3]));
    fprintf(stderr, "usage: churn server PORT WORKERS | churn client PORT SECONDS\n");
    return 2;
}
